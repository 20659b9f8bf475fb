"""What a ``prism`` process prints, set up once by the CLI: our own lines in full, third-party noise
once.

A pipeline builds models, optimizers and engines again in every stage, and the libraries under it
(megatron-core, transformers, torch) repeat the same warning each time: in a Slurm log that is the
same paragraph five times per rank. So warnings from other packages are shown **once per message**
(ours keep Python's default, once per place), log records of other packages are deduplicated by
message, their INFO chatter is raised to WARNING, and library progress bars (transformers'
"Writing model shards") are off when the output is not a terminal. Light on purpose: it imports
neither torch nor the libraries it quiets.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

OWN_PACKAGE = "megatron_prism"
THIRD_PARTY_LOGGERS = ("megatron", "torch", "transformers", "triton", "urllib3", "PIL")


class OncePerMessage(logging.Filter):
    """Passes a record of another package only the first time its message text is seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == OWN_PACKAGE or record.name.startswith(OWN_PACKAGE + "."):
            return True
        key = (record.name.split(".")[0], record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def configure_console(stream=None) -> None:
    """Logging format and levels, once-only third-party warnings, no library progress bars off a
    terminal. Call before the heavy imports (their import-time warnings are filtered too)."""
    stream = stream if stream is not None else sys.stderr
    logging.basicConfig(level=logging.INFO, format="[prism] %(levelname)s %(name)s: %(message)s", stream=stream)
    for name in THIRD_PARTY_LOGGERS:  # their INFO lines drown the run's progress
        logging.getLogger(name).setLevel(logging.WARNING)
    once = OncePerMessage()
    for handler in logging.getLogger().handlers:
        handler.addFilter(once)
    for category in (UserWarning, FutureWarning, DeprecationWarning, RuntimeWarning):
        warnings.filterwarnings("once", category=category)
    warnings.filterwarnings("default", module=OWN_PACKAGE)  # ours: once per place, as Python does
    # megatron-core announces at import time every optional package it falls back from (Transformer
    # Engine, Apex); which backend the model really uses is chosen and reported by our own specs.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"Apex is not installed", category=UserWarning)
    if not _isatty(stream):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers at import


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """``70`` -> ``1m10s``; ``3725`` -> ``1h02m``; ``8`` -> ``8s`` (for ETAs in log lines)."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class CountProgress:
    """Progress of a counted job that is not a training loop (checking a split's images): on a
    terminal one line rewritten in place, elsewhere (a Slurm log) ``[prism] LABEL: n/N UNIT`` at
    each tenth and at the end, so a long check shows it is alive without flooding the log. Only
    the process of rank 0 (torchrun's ``RANK``) prints: every rank does the same work."""

    def __init__(self, label: str, total: int, *, unit: str = "items", stream=None, tty: bool | None = None,
                 enabled: bool | None = None) -> None:
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.enabled = os.environ.get("RANK", "0") == "0" if enabled is None else enabled
        self._every = max(total // 10, 1)

    def line(self) -> str:
        return f"[prism] {self.label}: {self.done}/{self.total} {self.unit}"

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if not self.enabled:
            return
        if self.tty:
            print("\r" + self.line(), end="\n" if self.done >= self.total else "", file=self.stream, flush=True)
        elif self.done >= self.total or self.done // self._every > before // self._every:
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """Ends an unfinished line on a terminal (the job stopped early, e.g. on an error)."""
        if self.enabled and self.tty and 0 < self.done < self.total:
            print(file=self.stream, flush=True)
