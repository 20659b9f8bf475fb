"""The `prism` command: `prism run` records the resolved config and walks the stages; config
mistakes are one clear line on stderr, not a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_prism.cli import main
from megatron_prism.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"

# A real but short run: the tiny model, a few steps per stage, small synthetic splits.
SHORT = ["run.logger=none", "data.synth_sizes=sft=24,align=4,rl=8,eval=4", "stages.sft.steps=2",
         "stages.sft.global_batch_size=4", "stages.sft.eval_every=0", "stages.rlvr.steps=1",
         "stages.rlvr.global_batch_size=2", "stages.rlvr.eval_every=0", "rollout.n=2", "rollout.max_new_tokens=16",
         "stages.warmup.rollout.max_new_tokens=64", "stages.align.rollout.max_new_tokens=64",  # the demonstrations' budget
         "parallel.micro_batch_size=4", "optim.warmup_steps=0"]  # (a warm-up as long as a stage is refused)


def _prism(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "megatron_prism.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=timeout,
    )


def test_run_walks_every_stage_hands_the_discriminator_on_and_reports(tmp_path):
    """One ``prism run`` of the whole pipeline, a few steps each (SFT -> WARMUP -> ALIGN -> RLVR ->
    EVAL): the resolved config, the report and its curves, one greppable log line per step, ALIGN
    starting from WARMUP's discriminator and ending with a policy checkpoint and a discriminator of
    its own; then the same command again runs nothing twice."""
    out_dir = tmp_path / "run"
    game = ["data.synth_sizes=sft=24,align=20,rl=8,eval=4", "stages.warmup.steps=2",
            "stages.warmup.global_batch_size=4", "stages.align.steps=2", "stages.align.global_batch_size=2",
            "stages.align.eval_every=0", "stages.align.save_every=1", "align.samples_per_prompt=2"]
    overrides = [f"run.output_dir={out_dir}", "optim.lr=1e-6", *SHORT, *game]
    proc = _prism("run", str(TINY), *overrides, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[prism] stage ")]
    assert started == [f"[prism] stage {s}" for s in ("sft", "warmup", "align", "rlvr", "eval")]
    assert f"[prism] report: {out_dir / 'report.md'} and {out_dir / 'report.json'}" in proc.stdout

    written = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert written["optim"]["lr"] == 1e-6
    assert written["stages"]["sft"]["steps"] == 2
    assert written["run"]["output_dir"] == str(out_dir)
    assert load_config(out_dir / "config.yaml", []) == load_config(TINY, overrides)

    report = json.loads((out_dir / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["sft", "warmup", "align", "rlvr", "eval"]
    assert [s["steps"] for s in report["stages"][:4]] == [2, 2, 2, 1]
    md = (out_dir / "report.md").read_text()
    assert all(f"| {name} |" in md for name in ("sft", "rlvr", "eval"))
    # the curves embedded in the report; one greppable line per stage in a log (stderr is not a terminal)
    assert "![curves](plots/curves.png)" in md and (out_dir / "plots" / "curves.png").is_file()
    assert re.search(r"^\[sft\] step 1/2 loss \S+ grad \S+ lr \S+ tok/s \d+ eta \d+s$", proc.stderr, re.M), proc.stderr
    assert re.search(r"^\[rlvr\] step 1/1 loss \S+ reward \S+ acc \S+ .* done in \d+s$", proc.stderr, re.M)
    for name in ("sft", "warmup", "align", "rlvr"):
        assert (out_dir / name / "result.json").is_file()
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rlvr_steps = [rec for rec in steps if rec["stage"] == "rlvr"]
    assert rlvr_steps and all(k in rlvr_steps[0] for k in ("reward/mean", "reward/accuracy", "throughput/tokens_per_s", "time/rollout_s"))

    # The game: WARMUP trains the discriminator only; ALIGN starts from it.
    by_stage = {s["stage"]: s for s in report["stages"]}
    sft_ckpt = by_stage["sft"]["checkpoint"]
    warm, align = by_stage["warmup"], by_stage["align"]
    assert warm["checkpoint"] == sft_ckpt
    warm_disc = warm["metrics"]["artifacts"]["discriminator"]
    assert align["metrics"]["final"] and "disc/caption/acc" in align["metrics"]["final"]
    assert json.loads((out_dir / "align" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())[
        "extra"]["disc_start"] == warm_disc
    assert align["checkpoint"].startswith(str(out_dir / "align" / "checkpoints"))
    assert by_stage["rlvr"]["checkpoint"].startswith(str(out_dir / "rlvr" / "checkpoints"))
    from megatron_prism.models.discriminator import is_discriminator_checkpoint

    assert is_discriminator_checkpoint(warm_disc) and is_discriminator_checkpoint(align["metrics"]["artifacts"]["discriminator"])
    align_steps = [r for r in steps if r["stage"] == "align" and "disc/invalid_rate" in r]
    assert [r["step"] for r in align_steps] == [1, 2]
    assert all(k in align_steps[0] for k in ("disc/grad_norm", "moe/max_over_mean_load", "advantage/mean", "loss"))
    rows = {line.split("|")[1].strip(): line for line in md.splitlines()[md.splitlines().index(
        "| stage | caption acc | reasoning acc | caption gap | reasoning gap | invalid rate | game objective |"):]
        if line.startswith("| ") and "->" in line}
    assert set(rows) == {"warmup", "align"} and "nan" not in rows["warmup"] + rows["align"]

    # The same command again: every stage is finished, nothing runs twice.
    again = _prism("run", str(TINY), *overrides, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished, skipped") == 5


def test_unknown_stage_is_one_line_before_anything_runs(tmp_path):
    proc = _prism("run", str(TINY), f"run.output_dir={tmp_path}", *SHORT, "stages.warmupp.enabled=true")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prism: error: ") and "did you mean 'stages.warmup" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "[prism] stage" not in proc.stdout
    assert not (tmp_path / "sft").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1e-6", "unknown key 'optim.lrr' in override 'optim.lrr=1e-6' (config {tiny}); did you mean 'optim.lr'?"),
        ("parallel.tp=two", "key 'parallel.tp' in override 'parallel.tp=two' (config {tiny}) expects int, got str 'two'"),
        ("optim.lr", "override 'optim.lr' is not of the form key=value (for example optim.lr=1e-6)"),
    ],
)
def test_bad_override_is_one_line_on_stderr(tmp_path, override, message):
    proc = _prism("run", str(TINY), f"run.output_dir={tmp_path / 'never'}", override)
    assert proc.returncode == 2
    assert proc.stderr == f"prism: error: {message.format(tiny=TINY)}\n"
    assert "Traceback" not in proc.stderr
    assert "stage " not in proc.stdout
    assert not (tmp_path / "never").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_convert_delegates_to_the_conversion_functions(monkeypatch, tmp_path, capsys):
    import megatron_prism.models.conversion as conversion

    calls = []
    monkeypatch.setattr(conversion, "convert_hf_to_megatron", lambda *a, **k: calls.append(("h2m", a, k)) or tmp_path / "m")
    monkeypatch.setattr(conversion, "convert_megatron_to_hf", lambda *a, **k: calls.append(("m2h", a, k)) or tmp_path / "h")
    assert main(["convert", "hf-to-megatron", "--hf-dir", "H", "--out", "M", "--tp", "2", "--pp", "2"]) == 0
    assert main(["convert", "megatron-to-hf", "--megatron-dir", "M", "--out", "H2"]) == 0
    assert calls == [("h2m", ("H", "M"), {"tp": 2, "pp": 2}), ("m2h", ("M", "H2"), {})]
    assert "written to" in capsys.readouterr().out


def test_convert_reports_checkpoint_errors_without_traceback(tmp_path, capsys):
    # The real conversion on a directory that is not a checkpoint: one line, exit 2.
    rc = main(["convert", "hf-to-megatron", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: ") and "nope/config.json: no config.json" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def test_convert_rejects_non_positive_sizes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "hf-to-megatron", "--hf-dir", "H", "--out", "M", "--tp", "0"])
    assert exc.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_same_compute_control_runs_align_with_the_verifiable_reward(tmp_path):
    """The ``rl-on-align-prompts`` arm: the ALIGN stage's loop with ``algorithm.reward`` instead of
    the game (no discriminator is built or written), for ALIGN's steps and samples."""
    from megatron_prism.experiments.arms import ARMS

    out_dir = tmp_path / "run"
    control = [*ARMS.get("rl-on-align-prompts").overrides, "data.synth_sizes=sft=24,align=20,rl=8,eval=4",
               "stages.rlvr.enabled=false", "stages.eval.enabled=false", "stages.align.steps=2",
               "stages.align.global_batch_size=2", "stages.align.eval_every=0", "stages.align.save_every=2",
               "align.samples_per_prompt=2"]
    proc = _prism("run", str(TINY), f"run.output_dir={out_dir}", *SHORT, *control, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[prism] stage ")]
    assert started == ["[prism] stage sft", "[prism] stage align"]
    assert "stages disabled or absent: warmup, rlvr, eval" in proc.stdout
    align = {s["stage"]: s for s in json.loads((out_dir / "report.json").read_text())["stages"]}["align"]
    assert align["metrics"]["policy_reward"] == "verifiable" and align["steps"] == 2
    assert not (out_dir / "align" / "disc_checkpoints").exists() and not (out_dir / "align" / "discriminator_init").exists()
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    align_steps = [r for r in steps if r["stage"] == "align" and "reward/accuracy" in r]
    assert len(align_steps) == 2 and all("disc/grad_norm" not in r for r in align_steps)
