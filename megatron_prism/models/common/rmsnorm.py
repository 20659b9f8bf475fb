"""RMSNorm with megatron's norm signature, usable under sequence parallelism.

megatron's torch-norm wrapper refuses sequence parallelism, and Transformer Engine is GPU-only, so
the local spec uses this module. It computes in float32 and casts back before scaling, exactly as
Qwen3 does, so logits match the Hugging Face model bit-for-bit in fp32.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in float32."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        self.eps = eps
        # Under sequence parallelism each TP rank sees a slice of the sequence, so its weight
        # gradient is partial: megatron's finalize_model_grads all-reduces params marked so.
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
