"""Run reward functions in killable worker processes with per-item timeouts.

Verifiers can hang on adversarial model output: sympy happily starts computing
``9^{9^{9^{9^{9}}}}`` or ``(10^{10})!`` and never returns, inside one C call that neither a
``signal.alarm`` nor a thread can interrupt (math-verify's own ``timeout_seconds`` relies on
SIGALRM, which in addition only works in the main thread). ``concurrent.futures`` pools cannot
cancel a running task either. ``RewardPool`` therefore keeps its own small set of worker
processes (see ``_worker``), hands each one item at a time, and when an item runs past its budget
kills that worker (SIGKILL, then reaps it — no zombie), scores the item 0 with
``timed_out=True``, counts it in ``STATS`` and starts a replacement. A worker's start-up time is
not charged to the item it runs next: items go only to workers that have reported ready.

Public API
    score_batch(name_or_fn, responses, answers, *, timeout_s=5.0, workers=2, item_kwargs=None,
                **kw) -> list[RewardResult]
    PooledReward(impl, timeout_s)   a registered reward whose per-call use goes through the pool
    get_pool(workers=None) / shutdown_pool()   the process-wide pool (shut down at exit)
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from megatron_prism.rewards.base import STATS, RewardResult, lookup_reward

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_ALL_POOLS: weakref.WeakSet[RewardPool] = weakref.WeakSet()


class _Worker:
    """One worker process and its connection; ``task`` is the index of the item it runs."""

    def __init__(self, memory_limit: int | None) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "megatron_prism.rewards._worker", str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send(("init", list(sys.path), memory_limit))
        self.ready = False
        self.started = time.monotonic()
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        """SIGKILL and reap (safe to call twice)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()

    def close(self, grace_s: float = 2.0) -> None:
        """Polite stop: closing the socket makes an idle worker exit; kill it if it does not."""
        self.conn.close()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RewardPool:
    """A fixed number of reward worker processes; ``run`` is serialised by a lock."""

    def __init__(self, workers: int = 2, *, memory_limit_mb: int | None = 8192,
                 start_timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.size = workers
        self.memory_limit = memory_limit_mb * 2**20 if memory_limit_mb else None
        self.start_timeout_s = start_timeout_s
        self.owner_pid = os.getpid()
        self._workers: list[_Worker] = []
        self._lock = threading.RLock()
        self._start_failures = 0
        _ALL_POOLS.add(self)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RewardPool:
        """Start missing workers without waiting for them (``run`` waits as needed)."""
        with self._lock:
            while len(self._workers) < self.size:
                self._workers.append(_Worker(self.memory_limit))
        return self

    def resize(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        with self._lock:
            self.size = workers
            while len(self._workers) > workers:
                self._workers.pop().close()

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._workers]

    def shutdown(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
            for w in workers:
                w.close()

    def _replace(self, worker: _Worker, restart: bool = True) -> None:
        worker.kill()
        self._workers.remove(worker)
        if restart:
            STATS.add(restarts=1)
            self._workers.append(_Worker(self.memory_limit))

    def _start_failed(self, worker: _Worker, why: str) -> None:
        self._start_failures += 1
        self._replace(worker, restart=False)
        if self._start_failures >= 3:
            raise RuntimeError(f"reward worker failed to start 3 times in a row ({why}); "
                               "run `python -m megatron_prism.rewards._worker` to see why")
        self.start()

    # ------------------------------------------------------------------ running
    def run(self, calls: Sequence[tuple[Callable[..., Any], tuple, Mapping[str, Any]]],
            timeout_s: float) -> list[tuple[str, Any]]:
        """Run ``fn(*args, **kwargs)`` for each call; returns ``(status, value)`` in order.

        status is ``"ok"`` (value: the return value), ``"error"`` (value: a message) or
        ``"timeout"`` (value: None). Raises if a call cannot be pickled (use module-level
        functions) or if workers repeatedly fail to start.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        try:
            payloads = [pickle.dumps((fn, tuple(args), dict(kwargs))) for fn, args, kwargs in calls]
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise TypeError(f"reward callables and arguments must be picklable "
                            f"(module-level functions, plain data): {exc}") from exc
        results: list[tuple[str, Any] | None] = [None] * len(payloads)
        with self._lock:
            if os.getpid() != self.owner_pid:
                raise RuntimeError("a RewardPool cannot be used from a forked child; use get_pool()")
            self.start()
            try:
                self._run_locked(payloads, results, timeout_s)
            except BaseException:  # e.g. KeyboardInterrupt: drop workers holding abandoned items
                for w in list(self._workers):
                    if w.task is not None:
                        self._replace(w, restart=False)
                raise
        STATS.add(calls=len(results), timeouts=sum(r[0] == "timeout" for r in results),
                  errors=sum(r[0] == "error" for r in results))
        return results  # type: ignore[return-value]

    def _run_locked(self, payloads: list[bytes], results: list[tuple[str, Any] | None],
                    timeout_s: float) -> None:
        todo, left = deque(range(len(payloads))), len(payloads)
        while left:
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.task is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send_bytes(payloads[i])
                    except OSError:  # died while idle: retry the item on a fresh worker
                        todo.appendleft(i)
                        self._replace(w)
                        continue
                    w.task, w.deadline = i, now + timeout_s
            waiting = [w for w in self._workers if not w.ready or w.task is not None]
            ends = [w.deadline if w.ready else w.started + self.start_timeout_s for w in waiting]
            by_conn = {w.conn: w for w in waiting}
            for conn in wait(list(by_conn), max(0.0, min(ends) - now)):
                w = by_conn[conn]
                try:
                    msg = conn.recv() if not w.ready else conn.recv_bytes()
                except (EOFError, OSError):
                    if not w.ready:
                        self._start_failed(w, f"exit code {w.proc.poll()}")
                        continue
                    results[w.task], left = ("error", "reward worker died"), left - 1
                    self._replace(w)
                    continue
                if not w.ready:
                    w.ready, self._start_failures = True, 0
                else:
                    try:
                        status, value = pickle.loads(msg)
                    except Exception as exc:  # noqa: BLE001 - e.g. a result class the parent lacks
                        status, value = "error", f"cannot unpickle result: {exc}"
                    results[w.task], left, w.task = (status, value), left - 1, None
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.task is not None and now >= w.deadline:
                    results[w.task], left = ("timeout", None), left - 1
                    self._replace(w)
                elif not w.ready and now >= w.started + self.start_timeout_s:
                    self._start_failed(w, f"not ready after {self.start_timeout_s:.0f} s")


_POOL: RewardPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(workers: int | None = None) -> RewardPool:
    """The process-wide pool (created on first use with 2 workers; resized if ``workers``)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.owner_pid != os.getpid():
            _POOL = RewardPool(workers or 2)
        elif workers is not None and workers != _POOL.size:
            _POOL.resize(workers)
        return _POOL


def shutdown_pool() -> None:
    """Stop the process-wide pool's workers (a later call starts a fresh pool)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.owner_pid == os.getpid():
        pool.shutdown()


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_ALL_POOLS):
        if pool.owner_pid == os.getpid():
            pool.shutdown()


# ---------------------------------------------------------------------- rewards through the pool

def _to_result(status: str, value: Any) -> RewardResult:
    if status == "timeout":
        return RewardResult(0.0, timed_out=True)
    if status == "error":
        return RewardResult(0.0, error=str(value))
    if isinstance(value, RewardResult):
        return value
    try:
        return RewardResult(float(value))
    except (TypeError, ValueError):
        return RewardResult(0.0, error=f"reward returned {type(value).__name__}, not a score")


def run_rewards(pool: RewardPool, fn: Callable[..., Any], responses: Sequence[str],
                answers: Sequence[str], timeout_s: float,
                item_kwargs: Sequence[Mapping[str, Any]] | None = None,
                **kw: Any) -> list[RewardResult]:
    """``fn(response, answer, **kw, **item_kwargs[i])`` for each item, in ``pool``."""
    extra = item_kwargs if item_kwargs is not None else [{}] * len(responses)
    if not len(responses) == len(answers) == len(extra):
        raise ValueError(f"lengths differ: {len(responses)} responses, {len(answers)} answers, "
                         f"{len(extra)} item_kwargs")
    calls = [(fn, (r, a), {**kw, **e}) for r, a, e in zip(responses, answers, extra)]
    return [_to_result(s, v) for s, v in pool.run(calls, timeout_s)]


@dataclass(frozen=True)
class PooledReward:
    """A reward whose work may hang (``math``): every call runs ``impl`` in the pool.

    ``impl`` is the in-process implementation (a module-level function, so that it pickles);
    calling the ``PooledReward`` itself runs it in the process-wide pool under ``timeout_s``
    (overridable per call with ``timeout_s=``).
    """

    impl: Callable[..., RewardResult]
    timeout_s: float = 5.0

    def __call__(self, response: str, answer: str, *, timeout_s: float | None = None,
                 **kw: Any) -> RewardResult:
        return run_rewards(get_pool(), self.impl, [response], [answer],
                           timeout_s or self.timeout_s, **kw)[0]


def unpooled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The in-process implementation of a reward (what a worker should run)."""
    return fn.impl if isinstance(fn, PooledReward) else fn


def score_batch(name_or_fn: str | Callable[..., Any], responses: Sequence[str],
                answers: Sequence[str], *, timeout_s: float = 5.0, workers: int = 2,
                item_kwargs: Sequence[Mapping[str, Any]] | None = None,
                **kw: Any) -> list[RewardResult]:
    """Score a batch in parallel in the process-wide pool, each item under ``timeout_s``.

    ``name_or_fn`` is a registered name or a picklable callable
    ``(response, answer, **kw) -> RewardResult | float``. ``kw`` goes to every item and
    ``item_kwargs[i]`` (e.g. ``{"options": [...]}``) to item ``i``. A timed-out item scores 0
    with ``timed_out=True``; a failing one 0 with ``error`` set; both are counted in ``STATS``.
    Rewards with their own ``score_batch`` (combined rewards) are delegated to it.
    """
    fn = lookup_reward(name_or_fn) if isinstance(name_or_fn, str) else name_or_fn
    if hasattr(fn, "score_batch"):
        return fn.score_batch(responses, answers, timeout_s=timeout_s, workers=workers,
                              item_kwargs=item_kwargs, **kw)
    return run_rewards(get_pool(workers), unpooled(fn), responses, answers, timeout_s,
                       item_kwargs, **kw)
