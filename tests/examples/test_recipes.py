"""The cluster recipes: --dry-run command lines for both scripts (no Slurm, no GPU), and the real
thing: examples/run_prism_8b.sh itself submitted with sbatch to a one-node Slurm, pointed by its
environment variables at the tiny model, the synthetic data and the tiny config (2 processes, CPU,
gloo), requeued with `scontrol requeue` in the middle of a training stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["convert", "sft", "warmup", "align", "rlvr", "export", "eval"]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRISM_", "SLURM_"))}
    env.update(PRISM_POLICY_HF_DIR=str(tmp / "Qwen3-VL-8B-Instruct"), PRISM_DISC_HF_DIR=str(tmp / "Qwen3-VL-2B-Instruct"),
               PRISM_DATA_ROOT=str(tmp / "data"), PRISM_OUTPUT_DIR=str(tmp / "out"), PRISM_VENV=str(ROOT / ".venv"),
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _dry(script: str, tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"examples/{script}", "--dry-run", *args], cwd=ROOT, env=_env(tmp, **env),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("size", ["8b", "4b"])
def test_dry_run_prints_every_stage_command(size, tmp_path):
    proc = _dry(f"run_prism_{size}.sh", tmp_path, PRISM_RL_ALGO="dapo",
                PRISM_POLICY_HF_DIR=str(tmp_path / f"Qwen3-VL-{size.upper()}-Instruct"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[recipe] ")]
    ran = [m.group(1) for line in lines if (m := re.match(r"\[recipe\] (\w+): running", line))]
    assert ran == STAGES
    cmds = [line for line in lines if " running" not in line]
    out = tmp_path / "out"
    assert any(f"prism convert hf-to-megatron --hf-dir {tmp_path}/Qwen3-VL-{size.upper()}-Instruct --out {out}/init" in c
               for c in cmds)
    runs = [c for c in cmds if "megatron_prism.cli run" in c]
    assert len(runs) == 5  # sft, warmup, align, rlvr, eval
    for c in runs:
        assert c.startswith("[recipe] srun --nodes=1 --ntasks-per-node=1 torchrun --nnodes=1 --nproc-per-node=8")
        assert f"prism_{size}.yaml model.megatron_dir={out}/init model.hf_dir=null data.root={tmp_path}/data" in c
        assert "algorithm.loss=dapo" in c and f"discriminator.hf_dir={tmp_path}/Qwen3-VL-2B-Instruct" in c
    # The k-th run enables the stages up to the k-th and disables the rest.
    assert "stages.sft.enabled=true stages.warmup.enabled=false" in runs[0]
    assert "stages.align.enabled=true stages.rlvr.enabled=false" in runs[2]
    assert "stages.rlvr.enabled=true stages.eval.enabled=true" in runs[4]
    assert any(f"prism convert megatron-to-hf --megatron-dir \\<checkpoint\\ in\\ {out}/run/rlvr/result.json\\>" in c
               for c in cmds)
    assert f"policy qwen3vl-{size}" in proc.stdout and "verdict: fits" in proc.stdout
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_errors_name_the_variable(tmp_path):
    env = _env(tmp_path)
    del env["PRISM_DATA_ROOT"]
    proc = subprocess.run(["bash", "examples/run_prism_8b.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "PRISM_DATA_ROOT is not set" in proc.stderr
    assert "not a stage" in _dry("run_prism_8b.sh", tmp_path, "--stage", "rl").stderr
    bad = _dry("run_prism_8b.sh", tmp_path, PRISM_OVERRIDES="parallel.tp=3")
    assert bad.returncode != 0 and "parallel.tp=3" in bad.stderr


def test_dry_run_one_stage(tmp_path):
    proc = _dry("run_prism_8b.sh", tmp_path, "--stage", "rlvr", PRISM_RL_ALGO="gspo")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"\[recipe\] (\w+): running", proc.stdout) == ["rlvr"]
    assert "algorithm.loss=gspo" in proc.stdout


def test_8b_recipe_refuses_small_gpus(tmp_path):
    proc = _dry("run_prism_8b.sh", tmp_path, PRISM_GPU_MEM="8")
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout and "layout does not fit" in proc.stderr


# ---- the real one-node Slurm ------------------------------------------------------------------------

TINY_OVERRIDES = ("run.logger=none stages.sft.steps=6 stages.sft.save_every=1 stages.sft.global_batch_size=4 "
                  "stages.sft.eval_every=0 stages.rlvr.steps=2 stages.rlvr.save_every=1 stages.rlvr.global_batch_size=2 "
                  "stages.rlvr.eval_every=0 rollout.n=4 rollout.max_new_tokens=32 parallel.micro_batch_size=4 "
                  "optim.warmup_steps=0 parallel.tp=2")  # TP=2 x DP=1 over the 2 tasks (see the report on DP>1 checkpoints)


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> Path:
    from megatron_prism.data.synth import SynthSizes, generate_dataset
    from megatron_prism.models.qwen3vl.tiny import save_tiny_for_tokenizer

    root = tmp_path_factory.mktemp("recipe_inputs")
    generate_dataset(root / "data", 1234, SynthSizes(sft=40, align=8, rl=16, eval=8), overwrite=True)
    save_tiny_for_tokenizer(root / "Qwen3-VL-8B-Instruct", root / "data" / "tokenizer", seed=1234)
    return root


def _submit(slurm, inputs: Path, out: Path) -> str:
    env = dict(_env(inputs, PRISM_OUTPUT_DIR=str(out), PRISM_CONFIG=str(ROOT / "examples/configs/tiny.yaml"),
                    PRISM_GPUS_PER_NODE="2", PRISM_STAGES="convert sft rlvr export eval",
                    PRISM_OVERRIDES=TINY_OVERRIDES), SLURM_CONF=slurm.env["SLURM_CONF"])
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", f"--output={out}.log", "examples/run_prism_8b.sh"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _wait_state(slurm, job: str, states: set[str], timeout: float, log: Path) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = slurm.job(job)
        if info.get("JobState") in states:
            return info
        if info.get("JobState") in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
            break
        time.sleep(0.5)
    raise AssertionError(f"job {job} is {slurm.job(job).get('JobState')}, wanted {states}:\n"
                         f"{log.read_text()[-4000:] if log.exists() else 'no log'}")


def _release_requeued(slurm, job: str, log: Path) -> None:
    """Start a requeued job now instead of after Slurm's ~2 min BeginTime delay. Not at once:
    slurmctld refuses to launch the new instance while the old one's credential is still being
    revoked ("Killing non-startable batch job: Job credential revoked", the job then FAILS), so
    wait until it is PENDING and give the old instance's teardown a few seconds, as the delay does."""
    _wait_state(slurm, job, {"PENDING"}, 120, log)
    time.sleep(5)
    slurm.run("scontrol", "update", f"jobid={job}", "starttime=now")


def _normalised_report(run_dir: Path) -> list[dict]:
    """report.json's stages without wall-clock figures and with the run directory factored out."""
    text = (run_dir / "report.json").read_text().replace(str(run_dir), "RUN")
    stages = json.loads(text)["stages"]
    for stage in stages:
        stage.pop("wall_seconds")
        stage.pop("throughput", None)  # timing shares and tokens/s
        final = stage["metrics"].get("final", {})
        for key in [k for k in final if k.startswith(("time/", "throughput/")) or k.endswith(("seconds", "_s"))]:
            del final[key]
    return stages


@pytest.fixture(scope="module")
def reference_run(slurm, tiny_inputs, tmp_path_factory) -> Path:
    """The uninterrupted reference, through the same script and the same Slurm."""
    ref_out = tmp_path_factory.mktemp("recipe") / "reference"
    ref_job = _submit(slurm, tiny_inputs, ref_out)
    _wait_state(slurm, ref_job, {"COMPLETED"}, 480, Path(f"{ref_out}.log"))
    return ref_out


def _wait_mid_stage(out: Path, log: Path, timeout: float = 180) -> str:
    """The middle of a training stage: a checkpoint written, no result yet."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        for stage in ("sft", "rlvr"):
            if (out / "run" / stage / "checkpoints" / "latest").exists() and not (out / "run" / stage / "result.json").exists():
                return stage
        time.sleep(0.1)


def _wait_for(log: Path, pattern: re.Pattern, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and pattern.search(log.read_text(errors="replace"))):
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)


def test_sbatch_requeue_then_usr1_resume_and_report_the_same(slurm, tiny_inputs, reference_run, tmp_path):
    """One job, interrupted twice as a cluster does it, ends with the uninterrupted run's report:

    1. ``scontrol requeue`` in the middle of a training stage (an operator, a node failure): the
       job comes back and the stage resumes from its last complete checkpoint;
    2. in that second instance, Slurm's warning signal (``--signal=B:USR1@300`` in the script; sent
       here with ``scancel --batch --signal=USR1``) makes the batch shell touch the stop file, the
       trainer checkpoint at the end of its step and exit 75, and the script requeue itself; the
       third instance resumes and finishes."""
    out = tmp_path / "interrupted"
    job = _submit(slurm, tiny_inputs, out)
    log = Path(f"{out}.log")
    interrupted = _wait_mid_stage(out, log)
    slurm.run("scontrol", "requeue", job)
    _release_requeued(slurm, job, log)
    _wait_for(log, re.compile(r"restart 1:.*: resumed from ", re.S))  # the second instance's trainer runs
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    _release_requeued(slurm, job, log)  # the script requeued itself
    info = _wait_state(slurm, job, {"COMPLETED"}, 480, log)
    assert int(info.get("Restarts", "0")) >= 2

    text = log.read_text()
    assert "restart 1:" in text and "restart 2:" in text  # SLURM_RESTART_COUNT=1, then 2
    second, third = text.split("restart 1:", 1)[1].split("restart 2:", 1)
    assert "convert: complete, skipped" in second
    if interrupted == "rlvr":
        assert "sft: complete, skipped" in second
    assert re.search(rf"{interrupted}: resumed from .*/{interrupted}/checkpoints/step_0*[1-9]", second), second[-3000:]
    assert "SIGUSR1" in second and "stop requested: the trainer checkpointed" in second, second[-3000:]
    assert re.search(r"(sft|rlvr): resumed from .*/checkpoints/step_0*[1-9]", third), third[-3000:]
    assert (out / "hf_final" / ".prism_export_complete").exists()
    assert _normalised_report(out / "run") == _normalised_report(reference_run / "run")


def test_container_mode_mounts_every_path_a_command_names(tmp_path):
    env = _env(tmp_path, PRISM_CONTAINER="/images/prism.sqsh")
    env.pop("PRISM_VENV")
    proc = subprocess.run(["bash", "examples/run_prism_8b.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "megatron_prism.cli run" in line]
    assert len(runs) == 5
    (mounts,) = {m.group(1) for line in runs if (m := re.search(r"--container-mounts=(\S+)", line))}
    mounted = {pair.split(":")[0] for pair in mounts.split(",")}
    assert mounted == {str(tmp_path / "out"), str(tmp_path / "data"), str(tmp_path / "Qwen3-VL-8B-Instruct"),
                       str(tmp_path / "Qwen3-VL-2B-Instruct"), str(ROOT)}
    assert all(f"--container-workdir={ROOT}" in line and "--container-image=/images/prism.sqsh" in line for line in runs)
