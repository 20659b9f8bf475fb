"""Token entropy of the policy's next-token distribution, ``H = logsumexp(z) - sum_v p_v z_v``.

``entropy_from_logits`` is the plain definition (it builds fp32 ``[T, V]`` temporaries).
``entropy_from_logits_chunked`` computes the same thing a block of rows at a time, so the only
``[T, V]`` tensor alive is the caller's logits in their own dtype (bf16 in training): at T=16K and
V=151936 an fp32 copy would be 10 GB. Its backward recomputes each block from the logits instead
of saving fp32 softmaxes: ``dH/dz_j = p_j (E_p[z] - z_j)``.

When the policy runs the fused linear -> log-prob kernel (``kernels/fused_linear_logprob.py``)
the entropy comes from that kernel and no logits exist at all; these functions serve callers that
do hold logits (evaluation, the discriminator, tests).
"""

from __future__ import annotations

import torch


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dimension, in fp32: ``[..., V] -> [...]``."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


class _ChunkedEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, flat.shape[0], chunk_rows):
            out[start:start + chunk_rows] = entropy_from_logits(flat[start:start + chunk_rows])
        ctx.save_for_backward(logits)
        ctx.chunk_rows = chunk_rows
        return out.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad_flat = grad_out.reshape(-1).float()
        grad = torch.empty_like(flat)
        rows = ctx.chunk_rows
        for start in range(0, flat.shape[0], rows):
            z = flat[start:start + rows].float()
            p = torch.softmax(z, dim=-1)
            mean_z = (p * z).sum(-1, keepdim=True)
            grad[start:start + rows] = (p * (mean_z - z) * grad_flat[start:start + rows, None]).to(grad.dtype)
        return grad.reshape(logits.shape), None


def entropy_from_logits_chunked(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Same value and gradient as :func:`entropy_from_logits`, holding at most ``chunk_rows x V``
    fp32 elements at a time (forward and backward)."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return _ChunkedEntropy.apply(logits, chunk_rows)
