"""The run lock against real processes: a live holder is refused at once, naming it; a holder
SIGKILLed a moment ago does not block the rerun that follows it (the kernel releases its flock
while the process is torn down, which can outlast the parent's wait)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_prism.training import run_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time; from megatron_prism.training.run_lock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_holder_is_refused_at_once_and_a_killed_one_is_waited_for(tmp_path):
    proc = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(run_lock.RunLocked, match=rf"in use by another prism run \(host .*, pid {proc.pid},"):
            run_lock.RunLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 2.0  # no grace for a live run
        proc.send_signal(signal.SIGKILL)  # and take the lock at once, not after reaping it
        lock = run_lock.RunLock(tmp_path).acquire()
        assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        proc.kill()
        proc.wait()


def test_exiting_holder_is_told_from_a_live_one(tmp_path):
    path = tmp_path / "lock"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    for pid, host, exiting in ((int(gone.stdout), socket.gethostname(), True), (os.getpid(), socket.gethostname(), False),
                               (int(gone.stdout), "another-node", False)):
        path.write_text(json.dumps({"host": host, "pid": pid}))
        fd = os.open(path, os.O_RDONLY)
        try:
            assert run_lock._holder_exiting(fd) is exiting, (pid, host)
        finally:
            os.close(fd)
