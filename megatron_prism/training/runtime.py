"""The policy as a stage trains it: megatron chunks in DDP, the optimizer, and one
forward(-backward) over a list of micro-batches through megatron's own pipeline schedules.

Losses are computed on the last pipeline stage from the fused log-prob head's output
(:class:`TokenLogProbs`), never from logits. A loss function returns this micro-batch's share of
the global-batch loss (already normalised by global counts, see ``algorithms.aggregation``), so
megatron sums shares over micro-batches and data-parallel ranks (``calculate_per_token_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prism.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_prism.models import build_policy
from megatron_prism.models.common.token_logprobs import TokenLogProbs
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.models.qwen3vl.model import HeadRequest
from megatron_prism.parallel.devices import host_group, model_dtype
from megatron_prism.training.optimizer import PolicyOptimizer

MODEL_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "attention_mask", "position_ids", "cu_seqlens")
LossFn = Callable[[TokenLogProbs, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MicroBatch:
    """Model inputs (``MODEL_INPUTS``), next-token ``targets`` [b, s], and whatever the loss needs."""

    tensors: dict[str, Any]
    num_tokens: int = 0  # loss tokens, for throughput figures

    def model_kwargs(self) -> dict[str, Any]:
        return {k: self.tensors.get(k) for k in MODEL_INPUTS if k != "input_ids"}

    def on(self, device: torch.device) -> MicroBatch:
        """This micro-batch with its tensors on ``device`` (the device boundary, see ``to_device``)."""
        return MicroBatch(to_device(self.tensors, device), self.num_tokens)


def to_device(tensors: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The device boundary: host-built batch tensors moved once, non-blocking, to the model's
    device (tensors already there are kept as they are; other values pass through)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def model_device(chunks: list) -> torch.device:
    """Where the model's parameters live."""
    return next(p for c in chunks for p in c.parameters()).device


@dataclass
class PolicyRuntime:
    chunks: list
    hf_config: Any
    source: Path
    optimizer: PolicyOptimizer | None = None
    head_backend: str = "auto"

    @classmethod
    def build(cls, source: str | Path, model: ModelConfig, parallel: ParallelConfig,
              optim: OptimizerConfig | None, *, total_steps: int, seed: int, trainable: bool = True,
              head_backend: str = "auto") -> PolicyRuntime:
        """Policy chunks from a HF or megatron_prism directory, wrapped in megatron DDP with an
        optimizer when ``trainable`` (a frozen reference model gets neither)."""
        dtype = _DTYPES[model_dtype(model.dtype)]
        built = build_policy(source, tp=parallel.tp, pp=parallel.pp, vpp=parallel.vpp,
                             sequence_parallel=parallel.sequence_parallel, dtype=dtype,
                             recompute=model.recompute, backend=model.attention_backend, seed=seed)
        chunks = built if isinstance(built, list) else [built]
        source = Path(source)
        hf_dir = source / "hf" if (source / "hf").is_dir() else source
        hf_config = read_hf_config(hf_dir)
        if not trainable:
            for c in chunks:
                c.eval().requires_grad_(False)
            return cls(chunks, hf_config, hf_dir, None, head_backend)
        chunks = wrap_ddp(chunks, distributed_optimizer=optim.use_distributed_optimizer)
        opt = PolicyOptimizer(chunks, optim, total_steps=total_steps, bf16=dtype == torch.bfloat16)
        return cls(chunks, hf_config, hf_dir, opt, head_backend)

    @property
    def config(self):
        return getattr(self.chunks[0], "module", self.chunks[0]).config

    @property
    def packed_layout(self) -> str:
        """How the model keeps packed samples apart: ``mask`` (dense, local spec) or ``thd`` (TE)."""
        return getattr(self.chunks[0], "module", self.chunks[0]).packed_layout

    def train(self, mode: bool = True) -> None:
        for c in self.chunks:
            c.train(mode)

    def run(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn, *, forward_only: bool = False,
            with_entropy: bool = False, collect: Callable[[int, TokenLogProbs], None] | None = None) -> list[dict]:
        """Forward (and backward unless ``forward_only``) of every micro-batch; returns the metrics
        dicts of the loss function on the last pipeline stage (an empty list elsewhere).
        ``collect(index, output)`` sees each micro-batch's head output on the last stage."""
        if not micro_batches:
            return []

        device = model_device(self.chunks)

        def forward_step(index, model):
            mb = micro_batches[index].on(device)  # model inputs and loss inputs, once
            head = HeadRequest(mb.tensors["targets"], with_entropy=with_entropy, backend=self.head_backend)
            out = model(mb.tensors["input_ids"], head=head, **mb.model_kwargs())

            def loss_func(output: TokenLogProbs):
                if collect is not None:
                    collect(index, output)
                loss, metrics = loss_fn(output, mb.tensors)
                return loss, torch.tensor(max(mb.num_tokens, 1), dtype=torch.int64, device=device), metrics

            return out, loss_func

        return forward_backward(self.chunks, forward_step, len(micro_batches),
                                seq_length=max(mb.tensors["input_ids"].shape[1] for mb in micro_batches),
                                micro_batch_size=micro_batches[0].tensors["input_ids"].shape[0],
                                forward_only=forward_only)


def step_figures(local: dict[str, float]) -> dict[str, float]:
    """A step's summed loss-function figures as every rank logs them: taken from the last pipeline
    stage (the only one whose loss functions ran; others hold nothing) and summed over the
    data-parallel ranks (each holds its share of the global batch). Host values over host groups."""
    if not dist.is_initialized():
        return dict(local)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        box = [dict(local) if ps.is_pipeline_last_stage(ignore_virtual=True) else None]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=host_group("pipeline"))
        local = box[0]
    if ps.get_data_parallel_world_size() > 1 and local:
        keys = sorted(local)
        summed = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(summed, group=host_group("data_parallel"))
        local = dict(zip(keys, summed.tolist()))
    return dict(local)


def wrap_ddp(chunks: list, *, distributed_optimizer: bool) -> list:
    """megatron DDP around each model chunk (fp32 gradient buffers; reduce-scattered for the
    distributed optimizer, all-reduced otherwise: the two must agree)."""
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer)
    return [DistributedDataParallel(c.config, ddp_cfg, c) for c in chunks]


def forward_backward(chunks: list, forward_step: Callable[[int, Any], tuple[Any, Callable]], num_micro_batches: int,
                     *, seq_length: int, micro_batch_size: int, forward_only: bool) -> list[dict]:
    """megatron's pipeline schedule over ``num_micro_batches``; ``forward_step(index, model)``
    returns ``(output, loss_func)`` as megatron expects. Returns the loss functions' metrics dicts
    on the last pipeline stage (an empty list elsewhere). Shared by the policy and the
    discriminator runtimes."""
    vpp = len(chunks) > 1
    indices = [iter(range(num_micro_batches)) for _ in chunks] if vpp else iter(range(num_micro_batches))

    def step(data_iterator, model):
        return forward_step(next(data_iterator), model)

    out = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=indices,
        model=chunks if vpp else chunks[0],
        num_microbatches=num_micro_batches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return list(out) if ps.is_pipeline_last_stage(ignore_virtual=True) else []
