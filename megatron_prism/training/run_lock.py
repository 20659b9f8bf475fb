"""One ``prism run`` per output directory: an exclusive OS lock (``fcntl.flock``) on
``<run dir>/.prism.lock``, taken before the run touches anything else there.

The lock file records who holds it (host, pid, start time) for the refusal message, but the lock
is the OS's, not the file's existence: when the holder dies (even by SIGKILL) the kernel releases
it, so a stale file left by a killed run on the same host never blocks the next one. flock is
per host on most network file systems: two runs on different nodes sharing one directory are not
detected (a cluster runs one job per run directory; its scheduler is the guard there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".prism.lock"
EXITING_HOLDER_GRACE_S = 30.0  # how long to wait for a holder that is exiting to let go


class RunLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


# Locks this process holds (path -> count): taking the same lock again in the same process (the
# CLI, then the pipeline) is re-entrant; flock on a second descriptor would refuse ourselves.
_held: dict[Path, int] = {}


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = (Path(run_dir) / LOCK_FILE).absolute()
        self._fd: int | None = None
        self._nested = False

    def acquire(self) -> RunLock:
        if self.path in _held:
            _held[self.path] += 1
            self._nested = True
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + EXITING_HOLDER_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A holder killed a moment ago (a requeue, a rerun right after SIGKILL) still holds
                # the lock until the kernel has torn it down: wait for that, never for a live run.
                if _holder_exiting(fd) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLocked(f"{self.path.parent} is in use by another prism run ({holder}); wait for it to end, "
                                "stop it, or choose another run.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        os.fsync(fd)
        self._fd = fd
        _held[self.path] = 1
        return self

    def release(self) -> None:
        if self._nested:
            _held[self.path] -= 1
            self._nested = False
            return
        if self._fd is not None:
            _held.pop(self.path, None)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def rank0_run_lock(run_dir: str | Path) -> contextlib.AbstractContextManager:
    """The run directory's lock on the launch's rank 0 (``RANK`` unset or 0), nothing elsewhere:
    one process per run takes it, before the process groups exist."""
    return RunLock(run_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


def _holder_exiting(fd: int) -> bool:
    """Whether the recorded holder is on this host and gone or exiting (no such pid, a zombie, or
    a SIGKILL pending: Linux ``/proc``); False when that cannot be told, so a live run is refused."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        pid = int(info["pid"])
        if info.get("host") != socket.gethostname():
            return False
        with open(f"/proc/{pid}/status") as fh:
            status = dict(line.split(":", 1) for line in fh if ":" in line)
    except FileNotFoundError:
        return True  # the pid is gone; the kernel is releasing its lock
    except (OSError, ValueError, KeyError, TypeError):
        return False
    sigkill = 1 << 8  # signal 9 in the pending masks
    pending = int(status.get("SigPnd", "0").strip(), 16) | int(status.get("ShdPnd", "0").strip(), 16)
    return status.get("State", "").strip()[:1] in ("Z", "X") or bool(pending & sigkill)


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"
    except (OSError, ValueError):
        return "holder unknown"
