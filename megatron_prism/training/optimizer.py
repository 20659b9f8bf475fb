"""The optimizer side of every stage: megatron-core's optimizer and LR schedule, gradient
clipping, and the non-finite-gradient guard.

:meth:`PolicyOptimizer.step` is megatron's ``optimizer.step()`` taken apart at its own seams, so
that the non-finite guard sits between the gradient norm and the update: ``prepare_grads()``
(model gradients -> the fp32 main gradients of the optimizer's parameters), ``get_grad_norm()``
(megatron's norm over the optimizer's main gradients with its own grad-stats group: under the
distributed optimizer each data-parallel rank holds a shard, and megatron counts each shard once),
clipping by that norm (megatron's formula, ``max_norm / (norm + 1e-6)`` when below 1, applied to
the main gradients the update reads), then ``step_with_ready_grads()``. The logged grad norm is
that one, the norm megatron's ``step()`` itself returns; the model's reduced gradient buffers are
never read (under the distributed optimizer they are partly reduce-scattered).

Precision: ``bf16`` weights train with fp32 main gradients and fp32 main parameters (megatron's
mixed-precision optimizer). ``float16`` is refused: it needs megatron's loss scaler driven through
the schedules, which this trainer does not do.

State: megatron's distributed optimizer (``optim.use_distributed_optimizer``, on by default, on a
CPU too: ``cpu_compat.distributed_optimizer_types``) shards the fp32 main parameters and Adam's
moments over the data-parallel ranks. Its ``state_dict()`` leaves those out, so
:meth:`PolicyOptimizer.state_dict` carries them too (``optimizer_state``): saving and loading it are
collectives over the data-parallel ranks.

A step whose gradient norm is NaN or infinite is skipped (gradients dropped, no update, the LR
schedule does not advance) and counted; after ``max_consecutive_skips`` in a row the run stops
with :class:`TrainingDiverged`, since a model that keeps producing such gradients will not recover.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_prism.config.schema import OptimizerConfig
from megatron_prism.parallel import cpu_compat
from megatron_prism.training import optimizer_state

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


@dataclass
class StepResult:
    updated: bool
    grad_norm: float
    lr: float
    skipped_in_a_row: int


class PolicyOptimizer:
    """megatron optimizer + LR schedule + clipping + non-finite guard for a list of DDP chunks."""

    def __init__(self, chunks: list, cfg: OptimizerConfig, *, total_steps: int, bf16: bool,
                 max_consecutive_skips: int = 3) -> None:
        self.chunks = chunks
        self.cfg = cfg
        dtypes = {p.dtype for c in chunks for p in c.parameters()}
        if torch.float16 in dtypes:
            raise ValueError("model.dtype=float16 needs megatron's loss scaler, which this trainer does not drive; "
                             "use model.dtype=bfloat16 (fp32 main grads) or float32")
        wrapped = {getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", None) for c in chunks}
        if wrapped != {cfg.use_distributed_optimizer}:
            raise ValueError(f"optim.use_distributed_optimizer={cfg.use_distributed_optimizer} but the model chunks are "
                             f"wrapped for use_distributed_optimizer={sorted(wrapped, key=str)}; wrap them with "
                             "training.runtime.wrap_ddp(chunks, distributed_optimizer=optim.use_distributed_optimizer)")
        mcfg = MegatronOptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            # clipping happens in step(), by megatron's norm (the guard needs the norm first)
            clip_grad=0.0, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        with cpu_compat.distributed_optimizer_types():
            self.optimizer = get_megatron_optimizer(mcfg, chunks)
        steps = max(total_steps, 1)
        warmup = min(cfg.warmup_steps, steps - 1)  # megatron requires warm-up < decay steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=steps, lr_decay_style=cfg.schedule,
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
        )
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> StepResult:
        """Reduce gradients, check them, clip, update, advance the LR schedule."""
        finalize_model_grads(self.chunks)
        self.optimizer.prepare_grads()  # -> fp32 main grads (bf16: copied; no loss scaler: no overflow flag)
        norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(norm):
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            log.warning("non-finite gradient norm (%s): update skipped (%d in a row, %d in total)",
                        norm, self.skipped_in_a_row, self.skipped_total)
            self.zero_grad()
            if self.skipped_in_a_row >= self.max_consecutive_skips:
                raise TrainingDiverged(
                    f"{self.skipped_in_a_row} consecutive steps had NaN/inf gradients; stopping. Lower the "
                    "learning rate, check the data of these steps, or resume from an earlier checkpoint"
                )
            return StepResult(False, norm, self.lr, self.skipped_in_a_row)
        self.skipped_in_a_row = 0
        if self.cfg.clip_grad > 0:
            scale = self.cfg.clip_grad / (norm + 1e-6)
            if scale < 1.0:
                # the parameters the update reads (fp32 main params; DP shards under the distributed optimizer)
                grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch._foreach_mul_(grads, scale)
        updated = self.optimizer.step_with_ready_grads()
        if updated:
            self.scheduler.step(increment=1)
        return StepResult(bool(updated), norm, self.lr, 0)

    def state_dict(self) -> dict[str, Any]:
        """Collective (every data-parallel rank calls it): the optimizer's state dict, the
        distributed optimizer's parameter state (on each part's data-parallel rank 0), the LR
        schedule and the skip count."""
        if not self._has_updated():
            # Before the first update there is nothing to save (and megatron's distributed
            # state_dict asserts on an empty Adam state without apex/TE): a load keeps the freshly
            # built optimizer, whose main params are the loaded weights, as this one's are.
            return {"optimizer": None, "parameter_state": None, "scheduler": self.scheduler.state_dict(),
                    "skipped_total": self.skipped_total}
        return {
            "optimizer": self.optimizer.state_dict(),
            "parameter_state": optimizer_state.gather_parameter_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "skipped_total": self.skipped_total,
        }

    def _has_updated(self) -> bool:
        """Whether an update has run (the schedule advances once per update, on every rank alike,
        so all ranks agree, as the collective gather needs; Adam's own per-rank state might not)."""
        return self.scheduler.num_steps > 0

    def load_state_dict(self, state: dict[str, Any], *, origin: str = "optimizer state") -> None:
        """Collective, inverse of :meth:`state_dict`; ``origin`` (the file) names errors."""
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            optimizer_state.scatter_parameter_state(self.optimizer, state.get("parameter_state"), origin=origin)
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_total = int(state["skipped_total"])
