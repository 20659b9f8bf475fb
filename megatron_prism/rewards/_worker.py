"""Entry point of one reward worker process: ``python -m megatron_prism.rewards._worker FD``.

The parent (``RewardPool``) talks to it over the socket ``FD`` with ``multiprocessing``
connections. It is a plain subprocess rather than a ``multiprocessing`` child so that starting or
replacing one never re-imports the trainer's ``__main__`` module (and torch with it); a worker
imports only this package, math-verify and sympy, and is ready in well under a second.

Protocol (parent -> worker): one ``("init", sys_path, memory_limit_bytes)`` tuple, then task
payloads as pickled bytes ``(fn, args, kwargs)``. Worker -> parent: ``("ready", pid)`` once
warmed up, then one ``("ok", result)`` or ``("error", message)`` per task. The parent enforces
time limits by killing the process; the worker never needs to cooperate.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection


def _die_with_parent() -> None:
    """Best effort (Linux): get SIGKILL when the parent dies, even in the middle of a C call."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _limit_memory(limit_bytes: int | None) -> None:
    if not limit_bytes:
        return
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    except (ImportError, ValueError, OSError):
        pass


def main(fd: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    try:
        _, sys_path, memory_limit = conn.recv()
    except (EOFError, OSError):
        return
    sys.path[:0] = [p for p in sys_path if p not in sys.path]  # so test-module rewards unpickle
    _limit_memory(memory_limit)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)

    import megatron_prism.rewards  # noqa: F401  (registers the rewards)
    from megatron_prism.rewards.math_reward import warm_up

    warm_up()
    try:
        conn.send(("ready", os.getpid()))
    except (EOFError, OSError):  # the pool was shut down while this worker was starting
        return
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):  # parent closed the pool or died
            return
        try:
            fn, args, kwargs = pickle.loads(payload)
            reply = pickle.dumps(("ok", fn(*args, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - any failure of the reward is reported, not fatal
            reply = pickle.dumps(("error", f"{type(exc).__name__}: {exc}"[:2000]))
        try:
            conn.send_bytes(reply)
        except (EOFError, OSError):
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
