"""Validate first, end to end through `prism`: every bad input issue 16 lists is one line on stderr
with exit status 2, and nothing was built, trained or written before it (no run directory, the
model builder and the pipeline never called)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_prism.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"


class Built(AssertionError):
    """Raised by the stand-ins below: something heavy started although the input was bad."""


@pytest.fixture
def nothing_may_be_built(monkeypatch):
    """The pipeline, the policy builder and the parallel set-up fail the test if anything reaches them."""
    import megatron_prism.parallel.state as state
    import megatron_prism.pipeline as pipeline
    from megatron_prism.training.runtime import PolicyRuntime

    def refuse(*_, **__):
        raise Built("reached a heavy step before the bad input was reported")

    monkeypatch.setattr(pipeline, "run", refuse)
    monkeypatch.setattr(PolicyRuntime, "build", classmethod(lambda cls, *a, **k: refuse()))
    monkeypatch.setattr(state, "init_parallel", refuse)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prism: error: "), err
    return lines[0]


RUN_CASES = [
    ("algorithm.loss=ppoo", "unknown policy loss 'ppoo'; did you mean 'ppo'?"),
    ("rollout.engine=vllmm", "unknown rollout engine 'vllmm'; did you mean 'vllm'?"),
    ("parallel.tp=0", "the tensor-parallel size must be at least 1"),
    ("stages.sft.steps=-3", "the sft step count must be at least 1"),
    ("data.synth_sizes=sft=abc", "the count 'abc' is not a whole number"),
    ("parallel.vpp=2", "needs pipeline parallelism"),
    ("data.root=/nothere", "'data.root' in override 'data.root=/nothere'"),
    ("algorithm.kl_kind=k9", "unknown KL estimator 'k9'"),
]


@pytest.mark.parametrize("override,words", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_refuses_a_bad_config_before_building_anything(tmp_path, capsys, nothing_may_be_built, override, words):
    out = tmp_path / "run"
    assert main(["run", str(TINY), f"run.output_dir={out}", override]) == 2
    line = _one_line(capsys)
    assert words in line and override.split("=")[0] in line
    assert not out.exists()


def test_model_hf_dir_without_config_json_names_that_key(tmp_path, capsys, nothing_may_be_built):
    empty = tmp_path / "model"
    empty.mkdir()
    assert main(["run", str(TINY), f"run.output_dir={tmp_path / 'run'}", f"model.hf_dir={empty}"]) == 2
    line = _one_line(capsys)
    assert f"key 'model.hf_dir' in override 'model.hf_dir={empty}'" in line and "--hf-dir" not in line


def test_a_malformed_record_with_lenient_false_is_one_line_before_anything_runs(tmp_path, capsys,
                                                                                nothing_may_be_built):
    root = tmp_path / "data"
    for split in ("sft", "eval", "rl", "align", "tokenizer"):
        (root / split).mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    for split in ("eval", "rl"):
        (root / split / "a.jsonl").write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n")
    (root / "align" / "a.jsonl").write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n")
    (root / "sft" / "a.jsonl").write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n{\"prompt\": 3}\n")
    out = tmp_path / "run"
    assert main(["run", str(TINY), f"run.output_dir={out}", f"data.root={root}", "data.lenient=false"]) == 2
    line = _one_line(capsys)
    assert f"{root / 'sft' / 'a.jsonl'}:2: field 'prompt' must be a string" in line
    assert not out.exists()


def test_overrides_may_come_after_options_and_print_config_prints_the_resolved_yaml(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(TINY), "--print-config", f"run.output_dir={out}", "optim.lr=1e-6"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 1e-6 and printed["run"]["output_dir"] == str(out)
    assert not out.exists()
    # the planner with its overrides last, as Hydra, verl and NeMo-RL users write them
    assert main(["plan", "examples/configs/prism_8b.yaml", "--nodes", "1", "--gpus-per-node", "8", "parallel.tp=3"]) == 2
    assert "does not divide the policy's 32 attention heads" in _one_line(capsys)


def test_eval_checks_benchmarks_and_checkpoint_before_building(tmp_path, capsys, nothing_may_be_built):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    base = ["eval", str(TINY), "--checkpoint", str(tmp_path / "ckpt")]
    assert main([*base, "--benchmark", "mathvista=/nothere"]) == 2
    assert "--benchmark mathvista=/nothere: /nothere does not exist" in _one_line(capsys)
    assert main([*base, "--benchmark", f"mathvistaa={tmp_path}"]) == 2
    assert "did you mean 'mathvista'?" in _one_line(capsys)
    assert main(["eval", str(TINY), "--checkpoint", str(tmp_path / "nope"), "--split", str(tmp_path)]) == 2
    assert f"--checkpoint {tmp_path / 'nope'}" in _one_line(capsys)
    assert main([*base, "--split", str(tmp_path / "nosplit")]) == 2
    assert f"--split {tmp_path / 'nosplit'}" in _one_line(capsys)
    assert main([*base, "--benchmark", "mathvista=/tmp", "algorithm.loss=ppoo"]) == 2  # overrides last
    assert "did you mean 'ppo'?" in _one_line(capsys)


def test_experiment_checks_every_arm_and_benchmark_first(tmp_path, capsys):
    base = ["experiment", str(TINY), "--seeds", "1", "--out", str(tmp_path / "exp")]
    assert main([*base, "--arms", "baseline,prizm"]) == 2
    assert "unknown experiment arm 'prizm'; did you mean 'prism'?" in _one_line(capsys)
    assert main([*base, "--arms", "baseline", "--benchmark", "mathvista=/nothere"]) == 2
    assert "/nothere does not exist" in _one_line(capsys)
    assert main([*base, "--arms", "baseline", "stages.rlvr.steps=-1"]) == 2
    assert "the rlvr step count must be at least 1" in _one_line(capsys)
    assert not (tmp_path / "exp").exists()


def _prism(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_prism.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_the_real_command_prints_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = _prism("run", str(TINY), f"run.output_dir={out}", "algorithm.loss=ppoo")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"prism: error: key 'algorithm.loss' in override 'algorithm.loss=ppoo' (config {TINY}) is 'ppoo': unknown "
        "policy loss 'ppoo'; did you mean 'ppo'? (registered: dapo, grpo, gspo, ppo, unclipped, vanilla)"]
    assert not out.exists()


def test_prism_import_and_prism_plot_from_the_command_line(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "rows.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}]))
    proc = _prism("import", "sharegpt", "sft/rows.json", "out/sft.jsonl", "--kind", "sft", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "imported 1 records to out/sft.jsonl" in proc.stdout and (tmp_path / "out" / "sft.jsonl").is_file()
    proc = _prism("import", "sharegpt", "sft/missing.json", "out/x.jsonl", "--kind", "sft", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such input file" in proc.stderr
    proc = _prism("plot", str(tmp_path / "nope"), "--out", str(tmp_path / "c.png"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such directory" in proc.stderr


@pytest.mark.parametrize("argv", [["--tp", "0"], ["--pp", "-2"]])
def test_conversion_tools_refuse_non_positive_sizes_at_the_argument(tmp_path, capsys, argv):
    from megatron_prism.models.conversion.cli import hf_to_megatron_main

    with pytest.raises(SystemExit) as exit_:
        hf_to_megatron_main(["--hf-dir", str(tmp_path), "--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
