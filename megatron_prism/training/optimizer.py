"""The optimizer side of every stage: megatron-core's optimizer and LR schedule, gradient
clipping, and the non-finite-gradient guard.

megatron-core's optimizer and ``OptimizerParamScheduler`` run unchanged on CPU and GPU with one
exception, kept here: its gradient clipping (``clip_grad_by_total_norm_fp32``) and its distributed
optimizer assert CUDA tensors. On a CPU the megatron optimizer is therefore built with clipping
off and without the distributed optimizer, and :meth:`PolicyOptimizer.step` clips the gradients
itself with the same global norm (computed by megatron's ``get_grad_norm_fp32`` over the
model-parallel group, counting tensor-parallel duplicates and shared weights once). On a GPU
megatron clips inside its step and the distributed optimizer is used.

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
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import param_is_not_shared

from megatron_prism.config.schema import OptimizerConfig
from megatron_prism.parallel import cpu_compat

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite gradients."""


@dataclass
class StepResult:
    updated: bool
    grad_norm: float
    lr: float
    skipped_in_a_row: int


def _main_grads(chunks) -> list[torch.Tensor]:
    """Each gradient once: shared (tied) weights and tensor-parallel duplicates are left out."""
    grads = []
    for chunk in chunks:
        for p in chunk.parameters():
            if not p.requires_grad:
                continue
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is None:
                continue
            if param_is_not_shared(p) and tensor_parallel.param_is_not_tensor_parallel_duplicate(p):
                grads.append(g)
    return grads


def global_grad_norm(chunks) -> float:
    """L2 norm of all gradients of the model, over every model-parallel rank."""
    grads = _main_grads(chunks)
    return float(get_grad_norm_fp32(grads, grad_stats_parallel_group=parallel_state.get_model_parallel_group()))


def _all_main_grads(chunks):
    for chunk in chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                yield g


class PolicyOptimizer:
    """megatron optimizer + LR schedule + clipping + non-finite guard for a list of DDP chunks."""

    def __init__(self, chunks: list, cfg: OptimizerConfig, *, total_steps: int, bf16: bool,
                 max_consecutive_skips: int = 3) -> None:
        self.chunks = chunks
        self.cfg = cfg
        self.clip_here = cpu_compat.on_cpu()  # megatron's own clipping asserts CUDA tensors
        mcfg = MegatronOptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            clip_grad=0.0 if self.clip_here else cfg.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=not cpu_compat.on_cpu(),
        )
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
        norm = global_grad_norm(self.chunks)
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
        if self.clip_here and self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            scale = self.cfg.clip_grad / (norm + 1e-6)
            for g in _all_main_grads(self.chunks):
                g.mul_(scale)
        updated, _, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        return StepResult(bool(updated), norm, self.lr, 0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "skipped_total": self.skipped_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_total = int(state["skipped_total"])
