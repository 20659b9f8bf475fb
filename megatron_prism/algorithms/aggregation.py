"""How a [B, T] matrix of token losses becomes one scalar: the four aggregation modes.

Every mode is a weighted token sum, ``loss = sum_{b,t} mask[b,t] * row_scale[b] * L[b,t]``; the
modes differ only in the per-sequence weight ``row_scale``. Writing them this way is what makes the
loss the *same function of the global batch* however the batch is cut into micro-batches and
data-parallel ranks: each piece passes the global token / sequence counts in, computes its share,
and the shares add up (megatron sums gradients over micro-batches and ranks). Without the global
counts each piece would normalise by its own size and the result would depend on the split.

Modes (names as in verl's ``agg_loss``):

* ``token-mean`` -- every token of the global batch weighs the same: ``1 / N_tokens``
  (DAPO, Yu et al. 2025, eq. 8: removes GRPO's preference for short responses);
* ``seq-mean-token-sum`` -- sum over a response's tokens, mean over responses: ``1 / N_seqs``;
* ``seq-mean-token-mean`` -- mean over a response's tokens, then over responses:
  ``1 / (len_b * N_seqs)`` (the original GRPO objective, Shao et al. 2024, eq. 3; GSPO's length
  normalisation);
* ``seq-mean-token-sum-norm`` -- sum over tokens divided by a constant length, mean over responses:
  ``1 / (norm_len * N_seqs)`` (Dr.GRPO, Liu et al. 2025: a constant instead of ``len_b``, so
  long and short responses get the same per-token weight). ``norm_len`` defaults to ``T``, the
  padded response length, which the trainer keeps constant (the rollout's max response length).
  verl divides by ``T`` only, without the ``1 / N_seqs`` that the paper's ``1/G`` prescribes.

A sequence with no unmasked token contributes nothing and is not counted in ``N_seqs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class GlobalCounts:
    """Sizes of the whole global batch (all micro-batches, all data-parallel ranks)."""

    tokens: float
    seqs: float


def local_counts(mask: torch.Tensor) -> GlobalCounts:
    """The counts of this piece alone; sum them over pieces (or all-reduce) to get the global ones."""
    lengths = mask.float().sum(-1)
    return GlobalCounts(tokens=float(lengths.sum()), seqs=float((lengths > 0).sum()))


def row_scale(
    mask: torch.Tensor,
    mode: str,
    counts: GlobalCounts | None = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """Per-sequence weights ``[B]`` (float64) such that ``sum(mask * row_scale[:, None] * L)`` is the
    aggregated loss. ``counts=None`` uses this piece's own counts (correct only for one piece)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")
    counts = counts or local_counts(mask)
    lengths = mask.double().sum(-1)
    present = lengths > 0
    ones = torch.ones_like(lengths)
    if mode == "token-mean":
        scale = ones / max(counts.tokens, 1.0)
    elif mode == "seq-mean-token-sum":
        scale = ones / max(counts.seqs, 1.0)
    elif mode == "seq-mean-token-mean":
        scale = 1.0 / (lengths.clamp(min=1.0) * max(counts.seqs, 1.0))
    else:
        length = float(norm_len if norm_len is not None else mask.shape[-1])
        if length <= 0:
            raise ValueError(f"norm_len must be positive, got {length}")
        scale = ones / (length * max(counts.seqs, 1.0))
    return torch.where(present, scale, torch.zeros_like(scale))


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    counts: GlobalCounts | None = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """``sum(mask * row_scale * loss_mat)``: the aggregated scalar for this piece of the batch."""
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} differ in shape")
    scale = row_scale(mask, mode, counts, norm_len).to(loss_mat.dtype)
    return (loss_mat * mask.to(loss_mat.dtype) * scale[:, None]).sum()
