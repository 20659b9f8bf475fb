"""Faults from outside on a real ``prism run`` subprocess (the tiny embedded model, SFT only, a few
steps): SIGKILL at a random moment, a second run on the same directory while the first is alive, a
stale lock after the kill, SIGTERM (Slurm's preemption) at a random moment of the resumed run, the
newest checkpoint garbled on disk before the last rerun, and divergence. The final weights must equal
an uninterrupted run's bit for bit and every non-timing figure of report.json must match.

Kill moments are drawn from a seeded RNG (``PRISM_FAULT_SEED``, default: random); the seed is
printed so that a failure can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.pipeline.prism_proc import ROOT, prism_argv, prism_env, report_figures, shard_tensors, stage_checkpoint

STEPS = 6
RUN = ["stages.rlvr.enabled=false", "stages.eval.enabled=false", "data.synth_sizes=sft=16,align=4,rl=4,eval=4",
       f"stages.sft.steps={STEPS}", "stages.sft.global_batch_size=2", "stages.sft.save_every=1",
       "stages.sft.eval_every=0", "optim.warmup_steps=0"]


def _seed() -> int:
    seed = int(os.environ.get("PRISM_FAULT_SEED", random.randrange(2**31)))
    print(f"fault-injection seed: PRISM_FAULT_SEED={seed}")
    return seed


def _start(run_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(prism_argv(run_dir, *RUN, *extra), cwd=ROOT, env=prism_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{text!r} not seen in {timeout} s"
        time.sleep(0.05)


def _finish(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(prism_argv(run_dir, *RUN, *extra), cwd=ROOT, env=prism_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _finish(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_kill_lock_preempt_garble_then_resume_bit_exact(reference, tmp_path):
    rng = random.Random(_seed())
    run_dir = tmp_path / "run"

    # 1. Two runs on one directory at once: one takes the lock, the other refuses in one line naming
    #    the holder. The holder gets SIGKILL at a random moment after its first step (mid-step or
    #    mid-save).
    runs = [_start(run_dir, tmp_path / f"run{i}.log") for i in range(2)]
    deadline = time.monotonic() + 240
    while all(r.poll() is None for r in runs):
        assert time.monotonic() < deadline, "neither run refused"
        time.sleep(0.05)
    loser = next(i for i, r in enumerate(runs) if r.poll() is not None)
    first, refused = runs[1 - loser], (tmp_path / f"run{loser}.log").read_text()
    assert runs[loser].returncode == 2, refused[-2000:]
    refusal = [ln for ln in refused.splitlines() if ln.startswith("prism: error:")]
    assert len(refusal) == 1 and "in use by another prism run" in refusal[0] and f"pid {first.pid}" in refusal[0]
    assert "Traceback" not in refused
    _wait_for(first, tmp_path / f"run{1 - loser}.log", "[sft] step 1/")
    kill_after = rng.uniform(0.0, 2.0)
    time.sleep(kill_after)
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL

    # 2. The rerun takes the lock the dead run left (an OS lock: no stale-file trap), resumes, and
    #    gets SIGTERM at a random moment: it finishes its step, saves, exits 75 in one line.
    resumed = _start(run_dir, tmp_path / "resumed.log")
    _wait_for(resumed, tmp_path / "resumed.log", "[prism] stage sft: ")
    term_after = rng.uniform(0.0, 1.0)
    time.sleep(term_after)
    os.killpg(resumed.pid, signal.SIGTERM)
    rc = resumed.wait(timeout=120)
    print(f"SIGKILL {kill_after:.2f} s after step 1's line; SIGTERM {term_after:.2f} s after the rerun's stage line, "
          f"which then exited {rc}")
    log = (tmp_path / "resumed.log").read_text()
    if rc != 0:  # it may have finished just before the signal
        assert rc == 75, log[-3000:]
        line = [ln for ln in log.splitlines() if ln.startswith("prism: preempted: stage sft stopped after step")]
        assert len(line) == 1 and "checkpoint " in line[0] and "exit 75: requeue" in line[0], log[-2000:]

        # 3. The newest checkpoint is garbled in place (same size): the last rerun passes over it in
        #    one line and resumes from the one before.
        newest = stage_checkpoint(run_dir, "sft")
        # one to fall back to (not so when the kill came before step 1's save)
        garble = len(list(newest.parent.glob("step_*"))) > 1
        if garble:
            shard = newest / "mp_rank_00_000.safetensors"
            data = bytearray(shard.read_bytes())
            at = rng.randrange(len(data) // 2, len(data) - 64)
            data[at:at + 64] = rng.randbytes(64)
            shard.write_bytes(bytes(data))
        last = _finish(run_dir)
        assert last.returncode == 0, last.stderr[-3000:]
        print(f"garbled {newest.name}: {garble}")
        if garble:
            assert f"checkpoint {newest.name} does not verify, passed over" in last.stdout, last.stdout[-2000:]

    assert not list(run_dir.glob("*/checkpoints/.tmp-*"))
    ref, got = shard_tensors(stage_checkpoint(reference, "sft")), shard_tensors(stage_checkpoint(run_dir, "sft"))
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ after the faults, e.g. {differ[:3]}"
    assert report_figures(run_dir) == report_figures(reference)


def test_divergence_saves_no_poison_and_exits_3(tmp_path):
    run_dir = tmp_path / "run"
    proc = _finish(run_dir, "stages.sft.lr=1e30", "optim.clip_grad=0")
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("prism: error:")]
    assert len(errors) == 1 and "training diverged: stage sft" in errors[0], proc.stderr[-2000:]
    assert "newest healthy checkpoint: " + str(run_dir / "sft" / "checkpoints" / "step_00000001") in errors[0]
    assert "Traceback" not in proc.stderr
    steps = sorted(p.name for p in (run_dir / "sft" / "checkpoints").glob("step_*"))
    assert steps == ["step_00000001"]  # the skip streak's steps were not saved
    assert all(torch.isfinite(t).all() for t in shard_tensors(run_dir / "sft" / "checkpoints" / steps[0]).values())
