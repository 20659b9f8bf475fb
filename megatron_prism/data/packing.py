"""SFT sequence packing: several demonstrations per row, each isolated from the others.

Packing removes padding waste (demonstrations vary a lot in length), but the samples in a row must
not see each other: attention is causal *within* a sample only, positions restart per sample
(Qwen3-VL's 3-D MRoPE positions are computed per sample with its own image grids), and the loss
covers each sample's response tokens only. Under the Transformer Engine layer spec the isolation
is expressed by ``cu_seqlens`` (THD layout for its fused attention kernels); under the local (SDPA)
spec by the equivalent block-diagonal causal mask. Both are produced here (the [L, L] mask only when
asked: ``dense_mask``); the tests check that a packed row gives the same per-sample losses as
the samples run one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_prism.data.processing import IGNORE_INDEX, DemonstrationInputs
from megatron_prism.models.qwen3vl.rope import mrope_position_ids


@dataclass
class VisionTokens:
    """Ids and merge size the MRoPE position computation needs."""

    image_token_id: int
    video_token_id: int
    spatial_merge_size: int


@dataclass
class PackedRow:
    input_ids: torch.Tensor  # [1, L]
    targets: torch.Tensor  # [1, L] next-token ids, IGNORE_INDEX outside responses and at seams
    position_ids: torch.Tensor  # [3, 1, L]
    attention_mask: torch.Tensor | None  # [1, 1, L, L] bool, True = masked (megatron); None without dense_mask
    cu_seqlens: torch.Tensor  # [n + 1] int32 sample boundaries (THD), padding excluded
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    sample_ids: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)


def next_token_targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels (the token itself, or IGNORE_INDEX) -> targets for position i = label of i + 1."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    return targets


def _plan(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy in arrival order: a row takes samples until the next does not fit (deterministic,
    keeps the data order, so resuming at a position reproduces the same rows)."""
    rows: list[list[int]] = []
    used = max_length
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, above the packing length {max_length}")
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack_demonstrations(
    examples: Sequence[DemonstrationInputs],
    max_length: int,
    vision: VisionTokens,
    *,
    pad_id: int,
    pad_to_multiple_of: int = 1,
    dense_mask: bool = True,
) -> list[PackedRow]:
    """Packs demonstrations into rows of at most ``max_length`` tokens (padded to a multiple).
    ``dense_mask=False`` leaves out the [L, L] mask (THD attention needs ``cu_seqlens`` only)."""
    out = []
    for members in _plan([e.input_ids.numel() for e in examples], max_length):
        ids, targets, positions, segments, spans = [], [], [], [], []
        pixels, grids = [], []
        cursor = 0
        for seg, i in enumerate(members):
            ex = examples[i]
            n = ex.input_ids.numel()
            ids.append(ex.input_ids)
            targets.append(next_token_targets_from_labels(ex.labels))
            pos, _ = mrope_position_ids(
                ex.input_ids[None], ex.image_grid_thw, None, None,
                image_token_id=vision.image_token_id, video_token_id=vision.video_token_id,
                spatial_merge_size=vision.spatial_merge_size,
            )
            positions.append(pos[:, 0])
            segments.append(torch.full((n,), seg, dtype=torch.long))
            spans.append((cursor, cursor + n))
            cursor += n
            if ex.pixel_values is not None:
                pixels.append(ex.pixel_values)
                grids.append(ex.image_grid_thw)
        length = -(-cursor // pad_to_multiple_of) * pad_to_multiple_of
        pad = length - cursor
        if pad:
            ids.append(torch.full((pad,), pad_id, dtype=torch.long))
            targets.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
            positions.append(torch.arange(pad).expand(3, pad))
            segments.append(torch.full((pad,), -1, dtype=torch.long))  # padding: its own segment
        mask = None
        if dense_mask:
            seg = torch.cat(segments)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            mask = (~(causal & (seg[:, None] == seg[None, :])))[None, None]
        bounds = [0] + [end for _, end in spans]
        out.append(PackedRow(
            input_ids=torch.cat(ids)[None],
            targets=torch.cat(targets)[None],
            position_ids=torch.cat(positions, dim=1)[:, None],
            attention_mask=mask,
            cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
            pixel_values=torch.cat(pixels) if pixels else None,
            image_grid_thw=torch.cat(grids) if grids else None,
            sample_ids=[examples[i].record.id for i in members],
            spans=spans,
        ))
    return out
