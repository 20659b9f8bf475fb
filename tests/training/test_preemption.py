"""The preemption hook: a signal or the stop file makes a step loop finish its step, checkpoint and
exit with status 75; all ranks agree on the step; a second SIGTERM kills at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from megatron_prism.training import preemption

ROOT = Path(__file__).resolve().parents[2]

# A step loop shaped like the stages': a step, then the hook; it "checkpoints" by writing the step.
LOOP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from megatron_prism.training import preemption
    preemption.install()
    out = Path(sys.argv[1])
    step = 0
    while step < 10_000:
        time.sleep(0.05)          # the step
        step += 1
        (out / "steps").write_text(str(step))
        if step == 1:
            (out / "ready").write_text("")
        if preemption.should_stop():
            (out / "saved").write_text(str(step))
            raise preemption.Preempted("sft", step)
""")


def _start(tmp_path: Path, **env: str) -> subprocess.Popen:
    full = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(tmp_path)], env=full, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "loop did not start"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_exits_75(tmp_path, sig):
    proc = _start(tmp_path)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == preemption.EXIT_PREEMPTED, proc.stderr.read()
    # It stopped at the end of a step and saved that very step.
    assert (tmp_path / "saved").read_text() == (tmp_path / "steps").read_text()


def test_stop_file(tmp_path):
    stop = tmp_path / "STOP"
    proc = _start(tmp_path, PRISM_STOP_FILE=str(stop))
    time.sleep(0.2)
    assert proc.poll() is None  # no file, no stop
    stop.write_text("")
    assert proc.wait(timeout=30) == preemption.EXIT_PREEMPTED
    assert (tmp_path / "saved").exists()


def test_second_sigterm_kills_at_once(tmp_path):
    # The loop below ignores the flag (a stage without the hook, or one stuck in a long step).
    stuck = LOOP.replace("if preemption.should_stop():", "if False:")
    full = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", stuck, str(tmp_path)], env=full)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None  # the first TERM only sets the flag
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM


def _rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        first = preemption.should_stop()  # nobody asked
        if rank == 1:
            preemption._requested.set()  # as the signal handler does, on one rank only
        results[rank] = (first, preemption.should_stop())
    finally:
        dist.destroy_process_group()


def test_should_stop_is_collective(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        assert dict(results) == {0: (False, True), 1: (False, True)}


def test_install_is_idempotent_and_uninstall_restores():
    before = signal.getsignal(signal.SIGUSR1)
    try:
        assert preemption.install() and preemption.install()
        assert signal.getsignal(signal.SIGUSR1) is preemption._handler
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert preemption.requested()
    finally:
        preemption.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before and not preemption.requested()
