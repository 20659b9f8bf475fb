"""Records -> model inputs: chat rendering, image processing, image-token expansion, tokenizing.

``InputProcessor.prompt(record)`` gives what the rollout engine needs (prompt ids and images);
``InputProcessor.demonstration(record)`` gives an SFT / alignment example whose labels are the
response tokens only (the prompt, system turn and image pads are ``IGNORE_INDEX``).

The tokenizer is a Hugging Face tokenizer loaded from a directory: the model's own for real runs,
the one the embedded task trains for itself otherwise. Its special tokens must include Qwen's
chat and vision tokens (:data:`megatron_prism.data.chat.SPECIAL_TOKENS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_prism.data import chat
from megatron_prism.data.images import ImageSettings, process_images, tokens_per_image
from megatron_prism.data.records import Record, RecordError

IGNORE_INDEX = -100


@dataclass
class PromptInputs:
    record: Record
    input_ids: torch.Tensor  # [s] int64
    pixel_values: torch.Tensor | None  # [patches, D]
    image_grid_thw: torch.Tensor | None  # [images, 3]


@dataclass
class DemonstrationInputs(PromptInputs):
    labels: torch.Tensor  # [s] int64, IGNORE_INDEX outside the response
    prompt_length: int


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a local directory (never the hub), checked for Qwen's tokens."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    missing = [t for t in chat.SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise ValueError(f"tokenizer {path} lacks Qwen's chat/vision tokens {missing}")
    return tok


class InputProcessor:
    """Turns records into token ids and pixel values for one tokenizer and image setting."""

    def __init__(self, tokenizer, images: ImageSettings = ImageSettings(), *, max_length: int = 4096,
                 system_prompt: str | None = chat.PRISM_SYSTEM_PROMPT) -> None:
        self.tokenizer = tokenizer
        self.images = images
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.image_pad_id = tokenizer.convert_tokens_to_ids(chat.IMAGE_PAD)
        self.im_end_id = tokenizer.convert_tokens_to_ids(chat.IM_END)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _expand_image_pads(self, ids: list[int], counts: list[int], where: str) -> list[int]:
        """Each ``<|image_pad|>`` -> as many pads as its image has LM tokens."""
        out: list[int] = []
        queue = list(counts)
        for token in ids:
            if token == self.image_pad_id:
                if not queue:
                    raise RecordError(f"{where}: more image placeholders than images")
                out.extend([token] * queue.pop(0))
            else:
                out.append(token)
        if queue:
            raise RecordError(f"{where}: {len(queue)} images have no placeholder")
        return out

    def prompt(self, record: Record) -> PromptInputs:
        where = record.origin or record.id
        pixel_values, grid = process_images(record.images, self.images, where)
        text = chat.render_prompt(record, self.system_prompt)
        counts = tokens_per_image(grid, self.images) if grid is not None else []
        ids = self._expand_image_pads(self._encode(text), counts, where)
        if len(ids) > self.max_length:
            raise RecordError(
                f"{where}: prompt is {len(ids)} tokens, above the maximum length {self.max_length}; "
                "shorten it, lower max_pixels, or raise the maximum length"
            )
        return PromptInputs(record, torch.tensor(ids, dtype=torch.long), pixel_values, grid)

    def demonstration(self, record: Record) -> DemonstrationInputs:
        where = record.origin or record.id
        prompt = self.prompt(record)
        response = self._encode(chat.render_response(chat.demonstration(record)))
        ids = torch.cat([prompt.input_ids, torch.tensor(response, dtype=torch.long)])
        if ids.numel() > self.max_length:
            raise RecordError(
                f"{where}: prompt + response is {ids.numel()} tokens, above the maximum length {self.max_length}"
            )
        labels = ids.clone()
        labels[: prompt.input_ids.numel()] = IGNORE_INDEX
        return DemonstrationInputs(record, ids, prompt.pixel_values, prompt.image_grid_thw, labels=labels,
                                   prompt_length=prompt.input_ids.numel())
