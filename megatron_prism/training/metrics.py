"""Scalars to TensorBoard (default) or W&B, and step progress a person can read, from rank 0 only.

* :class:`MetricsLogger` appends every scalar to ``metrics.jsonl`` (what reports, plots and tests
  read) and to TensorBoard (``<run>/tensorboard/<run.name>``, so ``tensorboard --logdir`` over
  several runs shows them by name) or W&B (``run.project``, ``run.name``, ``run.tags``). Both get
  the resolved config. A W&B run resumed in the same directory continues the same W&B run.
* :class:`StepProgress` shows a stage's step loop: a tqdm bar on a terminal; off a terminal (a
  Slurm log) one greppable line every ``run.log_every`` steps, as verl prints its step metrics::

      [sft] step 120/300 loss 0.71 lr 1.9e-3 tok/s 4100 eta 1m10s
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist

from megatron_prism.console import format_duration

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class MetricsLogger:
    """``log(stage, step, {"name": value})`` writes scalars under ``<stage>/<name>``; also appends
    them to ``metrics.jsonl`` in the run directory, which the reports and tests read.

    ``name`` names the run in W&B and TensorBoard (default: the run directory's name), ``project``
    and ``tags`` are W&B's; ``config`` (the resolved config as a dict) is logged with the run."""

    def __init__(self, out_dir: str | Path, backend: str = "tensorboard", *, name: str | None = None,
                 project: str = "megatron_prism", tags: Sequence[str] = (),
                 config: Mapping[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.backend = backend
        self.name = name or self.out_dir.resolve().name
        self.enabled = _is_rank0()
        self._writer = None
        self._wandb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
            if config is not None:
                self._writer.add_text("config", _as_markdown_yaml(config), 0)
            if tags:
                self._writer.add_text("tags", ", ".join(tags), 0)
        elif backend == "wandb":
            import wandb  # optional extra: pip install megatron_prism[wandb]

            id_file = self.out_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            self._wandb = wandb.init(project=project, name=self.name, tags=list(tags) or None,
                                     config=dict(config) if config is not None else None, dir=str(self.out_dir),
                                     id=run_id, resume="allow")
            id_file.write_text(self._wandb.id + "\n")

    @classmethod
    def for_run(cls, cfg, run_dir: str | Path) -> MetricsLogger:
        """The logger of a ``prism run``: ``run.logger``, ``run.name``/``project``/``tags`` and the
        resolved config (``cfg`` is a ``PrismConfig``)."""
        from megatron_prism.config import config_to_dict

        r = cfg.run
        return cls(run_dir, r.logger if r.logger != "none" else "jsonl", name=r.name, project=r.project,
                   tags=r.tags, config=config_to_dict(cfg))

    @property
    def tensorboard_dir(self) -> Path:
        return self.out_dir / "tensorboard" / self.name

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
            # W&B wants one increasing step over the whole run; each stage restarts at 1, so the
            # stage's own step is logged as a metric and used as that stage's x axis.
            self._wandb.log({f"{stage}/{k}": v for k, v in clean.items()} | {f"{stage}/step": step})

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def _as_markdown_yaml(config: Mapping[str, Any]) -> str:
    import yaml

    text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
    return "```yaml\n" + text + "```"  # TensorBoard renders text summaries as Markdown


# ----------------------------------------------------------------------------------- progress

#: (metric key, label) in the order a step line shows them, when the step has them.
SHOWN: tuple[tuple[str, str], ...] = (
    ("loss", "loss"), ("reward/mean", "reward"), ("reward/accuracy", "acc"), ("disc/train_loss", "disc_loss"),
    ("disc/train_caption_acc", "cap_acc"), ("disc/train_reasoning_acc", "rsn_acc"),
    ("disc/caption/acc", "cap_acc"), ("disc/reasoning/acc", "rsn_acc"), ("disc/objective", "objective"),
    ("disc/invalid_rate", "invalid"), ("kl", "kl"), ("entropy", "entropy"), ("response/length", "len"),
    ("grad_norm", "grad"), ("lr", "lr"), ("throughput/tokens_per_s", "tok/s"),
)


def compact(value: float) -> str:
    """A figure in few characters: ``0.7134`` -> ``0.713``, ``0.0019`` -> ``1.9e-3``, ``4100.2`` -> ``4100``."""
    if value == 0 or value != value or value in (float("inf"), float("-inf")):
        return str(value if value != 0 else 0)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1e-2:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def step_fields(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) of the figures of a step line."""
    out = []
    for key, label in SHOWN:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            out.append((label, compact(float(value))))
    return out


class StepProgress:
    """A stage's progress: ``step(metrics)`` after each step, ``close()`` at the end.

    On a terminal (``stream.isatty()``) it is a tqdm bar with the step's figures; elsewhere it
    prints ``[stage] step N/T <figures> eta ...`` on the first step, every ``every`` steps and on
    the last, one line each, so ``grep '\\[rlvr\\] step'`` on a Slurm log gives the curve. The ETA
    counts only the steps of this invocation (a resumed stage does not look faster than it is).
    """

    def __init__(self, stage: str, total: int, initial: int = 0, *, every: int = 10,
                 stream: IO[str] | None = None, tty: bool | None = None, enabled: bool | None = None) -> None:
        self.stage, self.total, self.done = stage, total, initial
        self.every = max(1, every)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.enabled = _is_rank0() if enabled is None else enabled
        self._start, self._start_step = time.perf_counter(), initial
        self._bar = None
        if self.enabled and self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=stage, file=self.stream, dynamic_ncols=True)

    def eta_seconds(self) -> float | None:
        steps = self.done - self._start_step
        if steps <= 0:
            return None
        return (time.perf_counter() - self._start) / steps * max(self.total - self.done, 0)

    def line(self, metrics: Mapping[str, Any]) -> str:
        figures = " ".join(f"{label} {text}" for label, text in step_fields(metrics))
        eta = self.eta_seconds()
        tail = f" eta {format_duration(eta)}" if eta is not None and self.done < self.total else ""
        if self.done >= self.total:
            tail = f" done in {format_duration(time.perf_counter() - self._start)}"
        return f"[{self.stage}] step {self.done}/{self.total}" + (f" {figures}" if figures else "") + tail

    def step(self, metrics: Mapping[str, Any] | None = None) -> None:
        self.done += 1
        if not self.enabled:
            return
        metrics = metrics or {}
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(" ".join(f"{label} {text}" for label, text in step_fields(metrics)))
            return
        first = self.done == self._start_step + 1
        if first or self.done % self.every == 0 or self.done >= self.total:
            print(self.line(metrics), file=self.stream, flush=True)

    # tqdm's interface, for loops that report their figures separately
    def update(self, n: int = 1) -> None:
        for _ in range(n):
            self.step({})

    def set_postfix(self, **figures: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**figures)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(total: int, initial: int, desc: str, *, every: int = 10) -> StepProgress:
    """The progress of a stage loop (rank 0; see :class:`StepProgress`)."""
    return StepProgress(desc, total, initial, every=every)
