"""Prompt + response rows -> one batched discriminator input (:class:`ScoreBatch`).

Both parts of a response are scored in **one** forward over prompt + response, reading the
hidden state at each part's final token (:mod:`.parts`). PRISM's critic runs two forwards per
response, ``prompt + caption`` and ``prompt + think+answer`` (the reasoning part never sees the
caption, and its positions continue straight after the prompt), one response at a time. With
``isolate_parts=True`` (default) we compute exactly that in the shared forward: tokens after the
caption do not attend to the caption (a 4-D mask) and their positions are shifted back by the
caption's length, so each score equals what PRISM's separate forward would give (tested against
the separate forwards). ``isolate_parts=False`` lets the reasoning part read the caption.

Positions are Qwen3-VL's 3-D MRoPE ids (:func:`mrope_position_ids`, the policy's own function,
tested against transformers), not the 1-D text positions PRISM's critic passes (it keeps only the
first MRoPE row, which is wrong at and after every image). Rows are right-padded.

``text_only``: the ``text-only`` ablation sees no image: pixel values are dropped and the image
and video pad tokens removed from the prompt (the ``<|vision_start|><|vision_end|>`` markers stay,
so the text still says an image was there). PRISM's text-only critic instead kept the pad tokens
in the text and fed them as ordinary embeddings.

Malformed responses (see :mod:`.parts`) get ``valid=False``; their two score positions are their
last real token so the batch keeps its shape, and their scores mean nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_prism.models.discriminator.parts import PartFinder
from megatron_prism.models.discriminator.router import CAPTION, PAD, PROMPT, REASONING
from megatron_prism.models.qwen3vl.rope import mrope_position_ids


@dataclass
class ScoreItem:
    """One prompt and one response to score (``PromptInputs`` of data.processing fit the prompt side)."""

    prompt_ids: Sequence[int] | torch.Tensor
    response_ids: Sequence[int] | torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


@dataclass
class ScoreBatch:
    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [b, s] 1/0, or [b, 1, s, s] bool (True = masked) when parts are isolated
    position_ids: torch.Tensor  # [3, b, s]
    part_labels: torch.Tensor  # [b, s] router.PAD / PROMPT / CAPTION / REASONING
    score_positions: torch.Tensor  # [b, 2] (caption end, answer end) in the row
    valid: torch.Tensor  # [b] bool
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    response_start: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [b]

    def model_inputs(self) -> dict:
        """Keyword arguments of :meth:`Qwen3VLDiscriminator.forward` (besides ``input_ids``)."""
        return dict(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw,
                    attention_mask=self.attention_mask, position_ids=self.position_ids,
                    part_labels=self.part_labels, score_positions=self.score_positions)


@dataclass(frozen=True)
class VisionTokens:
    image_token_id: int
    video_token_id: int
    spatial_merge_size: int

    @classmethod
    def of(cls, hf_config) -> VisionTokens:
        return cls(hf_config.image_token_id, hf_config.video_token_id, hf_config.vision_config.spatial_merge_size)


def _ids(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def make_score_batch(items: Sequence[ScoreItem], finder: PartFinder, vision: VisionTokens, *, pad_id: int,
                     isolate_parts: bool = True, text_only: bool = False, multiple_of: int = 1) -> ScoreBatch:
    """Collate ``items`` (lengths padded to a multiple of ``multiple_of``, e.g. the TP size under SP)."""
    drop = {vision.image_token_id, vision.video_token_id}
    prompts = [[t for t in _ids(it.prompt_ids) if t not in drop] if text_only else _ids(it.prompt_ids) for it in items]
    responses = [_ids(it.response_ids) for it in items]
    parts = [finder.find(r) for r in responses]
    b = len(items)
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    length = -(-length // multiple_of) * multiple_of
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    keep = torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), PAD, dtype=torch.long)
    positions = torch.zeros(b, 2, dtype=torch.long)
    caption = torch.zeros(b, 2, dtype=torch.long)  # [start, end] of the span the reasoning must not see
    for i, (p, r, part) in enumerate(zip(prompts, responses, parts)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        keep[i, :n] = 1
        labels[i, :n] = PROMPT
        if part.valid:
            cap_end, ans_end = len(p) + part.caption_end, len(p) + part.answer_end
            labels[i, len(p): cap_end + 1] = CAPTION
            labels[i, cap_end + 1: ans_end + 1] = REASONING
            positions[i] = torch.tensor([cap_end, ans_end])
            caption[i] = torch.tensor([len(p), cap_end + 1])
        else:
            positions[i] = n - 1
    pixels = grids = None
    if not text_only:
        with_images = [it for it in items if it.pixel_values is not None]
        if with_images:
            pixels = torch.cat([it.pixel_values for it in with_images])
            grids = torch.cat([it.image_grid_thw for it in with_images])
    pos3, _ = mrope_position_ids(input_ids, grids, None, keep, image_token_id=vision.image_token_id,
                                 video_token_id=vision.video_token_id, spatial_merge_size=vision.spatial_merge_size)
    mask: torch.Tensor = keep
    if isolate_parts:
        pos3, mask = _isolate(pos3, keep, caption)
    return ScoreBatch(input_ids, mask, pos3, labels, positions, torch.tensor([pt.valid for pt in parts]),
                      pixels, grids, torch.tensor([len(p) for p in prompts]))


def _isolate(pos3: torch.Tensor, keep: torch.Tensor, caption: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens after the caption neither see it nor count it in their positions (a row with an
    empty span, i.e. an invalid one, is plain causal)."""
    b, s = keep.shape
    idx = torch.arange(s)
    start, stop = caption[:, :1], caption[:, 1:]  # [b, 1]
    in_caption = (idx >= start) & (idx < stop)  # [b, s]
    after = (idx >= stop) & (stop > start)
    shift = (stop - start) * after  # text after a response's caption: positions are 1-D, shift all three rows
    pos3 = pos3 - shift.unsqueeze(0) * keep.unsqueeze(0)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & keep.bool()[:, None, :]
    allowed &= ~(after[:, :, None] & in_caption[:, None, :])
    allowed |= torch.eye(s, dtype=torch.bool)[None]  # padded rows attend to themselves (no empty softmax row)
    return pos3, (~allowed).unsqueeze(1)
