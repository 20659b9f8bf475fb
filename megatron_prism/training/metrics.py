"""Scalars to TensorBoard (default) or W&B, and a progress bar with ETA, from rank 0 only."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class MetricsLogger:
    """``log(step, {"name": value})`` writes scalars under ``<stage>/<name>``; also appends them to
    ``metrics.jsonl`` in the run directory, which the reports and tests read."""

    def __init__(self, out_dir: str | Path, backend: str = "tensorboard", *, run_name: str = "prism") -> None:
        self.out_dir = Path(out_dir)
        self.backend = backend
        self.enabled = _is_rank0()
        self._writer = None
        self._wandb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
        elif backend == "wandb":
            import wandb  # optional extra: pip install megatron_prism[wandb]

            self._wandb = wandb.init(project="megatron_prism", name=run_name, dir=str(self.out_dir))

    def log(self, stage: str, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        self._jsonl.write(json.dumps({"stage": stage, "step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for k, v in clean.items():
                self._writer.add_scalar(f"{stage}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in clean.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def progress(total: int, initial: int, desc: str):
    """A tqdm bar with ETA on rank 0 (disabled elsewhere)."""
    import sys

    # In a log file (no terminal) a bar redraws as lines: update at most every 10 s there.
    interval = 0.1 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, initial=initial, desc=desc, disable=not _is_rank0(), dynamic_ncols=True,
                mininterval=interval)
