"""Stop cleanly before a Slurm time limit or preemption: checkpoint, then exit with a status that
says "requeue me".

Two ways to ask a run to stop, both checked by :func:`should_stop` after every optimizer step:

* a signal (SIGUSR1, or SIGTERM) delivered to the training process: the handler only sets a flag,
  so the step in progress finishes; a second SIGTERM restores the default and kills at once;
* a stop file: the path in ``PRISM_STOP_FILE`` exists. The Slurm recipes use this one: sbatch's
  ``--signal=B:USR1@...`` reaches only the batch shell, which touches the file (torchrun would die
  of a SIGUSR1 sent to it, and nodes see a shared file at slightly different times, hence the
  collective below).

:func:`should_stop` is collective: every rank calls it at the same point and all get the same
answer (MAX all-reduce over the world), so all ranks save the same step and leave together. A stage
loop uses it like this, after the step's own periodic save::

    if preemption.should_stop():
        save(ctx, state)                          # skip if this step was just saved
        raise preemption.Preempted(ctx.stage.name, state.step)

``Preempted`` is a ``SystemExit`` with status :data:`EXIT_PREEMPTED` (75, EX_TEMPFAIL), so the
process leaves through every ``finally`` (metrics are flushed) and the launcher sees a distinct code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from megatron_prism.parallel.devices import comm_device

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", i.e. requeue
STOP_FILE_ENV = "PRISM_STOP_FILE"

_requested = threading.Event()
_installed: dict[int, object] = {}


class Preempted(SystemExit):
    """Raised by a stage loop after it checkpointed in response to a stop request."""

    def __init__(self, stage: str, step: int, checkpoint: Path | str | None = None) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.stage, self.step, self.checkpoint = stage, step, checkpoint

    def __str__(self) -> str:
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint yet"
        return (f"preempted: stage {self.stage} stopped after step {self.step} ({where}); rerun the same command "
                f"to resume (exit {EXIT_PREEMPTED}: requeue)")


def _handler(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGTERM and _requested.is_set():
        # A second TERM means "now": fall back to the default action and re-deliver it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _requested.set()


def install(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> bool:
    """Install the flag-setting handlers (idempotent). Returns False off the main thread, where
    Python cannot install signal handlers; the stop file still works there."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in signals:
        if sig not in _installed:
            _installed[sig] = signal.signal(sig, _handler)
    return True


def uninstall() -> None:
    """Restore the handlers that were there before :func:`install` (tests)."""
    for sig, previous in list(_installed.items()):
        signal.signal(sig, previous)  # type: ignore[arg-type]
        del _installed[sig]
    _requested.clear()


def requested() -> bool:
    """This process's view: a signal arrived, or the stop file exists."""
    if _requested.is_set():
        return True
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and Path(path).exists()


def should_stop() -> bool:
    """Collective: True on every rank when any rank saw a stop request."""
    local = requested()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop = bool(flag.item())
    if stop:
        log.warning("stop requested (signal or %s): checkpointing and exiting with status %d", STOP_FILE_ENV,
                    EXIT_PREEMPTED)
    return stop
