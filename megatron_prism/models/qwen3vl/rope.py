"""Qwen3-VL's 3-D multimodal rotary positions (MRoPE), interleaved.

Two pieces:

* :func:`mrope_position_ids` turns token ids (+ image/video grids) into ``[3, batch, seq]``
  temporal/height/width position ids. Text advances all three together; an image of
  ``t x h x w`` merged patches gets ``(start + t_i, start + h_i, start + w_i)`` and moves the
  text position on by ``max(h, w)``; video frames are separate single-frame grids (Qwen3-VL puts a
  timestamp between frames). Padding (attention_mask == 0) gets position 0 and does not advance.
* :class:`InterleavedMRoPE` maps those ids to rotary angles. Qwen3-VL interleaves the three axes
  over the frequency index (T, H, W, T, H, W, ...; the first ``3 * mrope_section[1]`` H slots and
  ``3 * mrope_section[2]`` W slots, T everywhere else), unlike Qwen2-VL's contiguous sections, which
  is what megatron's ``MultimodalRotaryEmbedding`` implements.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mrope_position_ids(
    input_ids: Tensor,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> tuple[Tensor, Tensor]:
    """Position ids ``[3, b, s]`` and per-sample deltas ``[b, 1]`` (max position + 1 - length).

    Images and videos are consumed in order across the batch, as the processor lays them out.
    Raises ValueError when the placeholder tokens and the grids disagree.
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    merge2 = spatial_merge_size * spatial_merge_size
    grids = {
        image_token_id: list(image_grid_thw.tolist()) if image_grid_thw is not None else [],
        video_token_id: [],
    }
    if video_grid_thw is not None:  # each frame is its own single-frame grid
        for t, h, w in video_grid_thw.tolist():
            grids[video_token_id].extend([[1, h, w]] * t)
    cursor = {image_token_id: 0, video_token_id: 0}

    # Built as Python lists, turned into one tensor at the end: per-piece torch ops (aranges,
    # meshgrids, cats, masked writes per sample) cost more than the arithmetic at prompt sizes,
    # e.g. 1.5 ms of the embedded engine's prefill at batch 16 on CPU.
    mask_list = attention_mask.bool().tolist() if attention_mask is not None else None
    all_ids = input_ids.tolist()
    axes: tuple[list[int], list[int], list[int]] = ([], [], [])  # t, h, w of every kept token, row-major
    deltas = []
    for b in range(batch):
        row = all_ids[b]
        ids_list = [t for t, k in zip(row, mask_list[b]) if k] if mask_list is not None else row
        pt, ph, pw = axes
        pos, i, n = 0, 0, len(ids_list)
        top = -1  # max position of the sample
        while i < n:
            tok = ids_list[i]
            if tok in (image_token_id, video_token_id):
                j = i
                while j < n and ids_list[j] == tok:
                    j += 1
                run = j - i
                while run > 0:  # a run may hold several adjacent images
                    k = cursor[tok]
                    if k >= len(grids[tok]):
                        kind = "image" if tok == image_token_id else "video frame"
                        raise ValueError(
                            f"sample {b}: more {kind} placeholder tokens than grids were given "
                            f"({len(grids[tok])} {kind} grids)"
                        )
                    t, h, w = grids[tok][k]
                    cursor[tok] += 1
                    lh, lw = h // spatial_merge_size, w // spatial_merge_size
                    count = t * h * w // merge2
                    if count > run:
                        raise ValueError(
                            f"sample {b}: a grid of {t}x{h}x{w} needs {count} placeholder tokens, "
                            f"only {run} follow"
                        )
                    for ti in range(t):  # (t, h, w) in meshgrid 'ij' order, offset by pos
                        for hi in range(lh):
                            pt.extend([pos + ti] * lw)
                            ph.extend([pos + hi] * lw)
                            pw.extend(range(pos, pos + lw))
                    if t * lh * lw:
                        top = max(top, pos + max(t, lh, lw) - 1)
                    pos += max(lh, lw)
                    run -= count
                i = j
            else:
                j = i
                while j < n and ids_list[j] not in (image_token_id, video_token_id):
                    j += 1
                text = range(pos, pos + j - i)
                pt.extend(text)
                ph.extend(text)
                pw.extend(text)
                pos += j - i
                top = max(top, pos - 1)
                i = j
        deltas.append(top + 1 - n if n else 0)
    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    flat = torch.tensor(axes, dtype=torch.long).view(3, -1)
    if attention_mask is not None:
        position_ids[:, attention_mask.bool().cpu()] = flat
    else:
        position_ids.view(3, -1)[:, : flat.shape[1]] = flat
    position_ids = position_ids.to(device)
    for tok, kind in ((image_token_id, "image"), (video_token_id, "video frame")):
        if cursor[tok] != len(grids[tok]):
            raise ValueError(
                f"{len(grids[tok])} {kind} grids were given but only {cursor[tok]} have placeholder "
                f"tokens in input_ids"
            )
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).view(batch, 1)


class InterleavedMRoPE(torch.nn.Module):
    """Rotary angles for Qwen3-VL: call as megatron calls its mrope module, returns [s, b, 1, d]."""

    def __init__(self, kv_channels: int, rotary_base: float, mrope_section: list[int]) -> None:
        super().__init__()
        if sum(mrope_section) != kv_channels // 2:
            raise ValueError(
                f"mrope_section {mrope_section} must sum to head_dim/2 = {kv_channels // 2}"
            )
        inv_freq = 1.0 / (
            rotary_base ** (torch.arange(0, kv_channels, 2, dtype=torch.int64).float() / kv_channels)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope_section = list(mrope_section)

    def forward(self, position_ids: Tensor, mrope_section: list[int] | None = None, cp_group=None) -> Tensor:
        section = self.mrope_section if mrope_section is None else list(mrope_section)
        if position_ids.dim() == 2:  # text-only [b, s]: the same position on all three axes
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # [3, b, s, d/2]
        merged = freqs[0].clone()
        for axis in (1, 2):
            idx = slice(axis, 3 * section[axis], 3)
            merged[..., idx] = freqs[axis][..., idx]
        emb = torch.cat((merged, merged), dim=-1)  # [b, s, d]
        return emb.transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, d]
