"""One rollout-engine interface: the trainer cannot tell the embedded engine from SGLang or vLLM.

The trainer hands an engine prompt token ids (with their images) and sampling settings and gets
back response token ids with the engine's per-token log-probs and a finish reason. Between
optimizer steps it streams the policy's new weights to the engine as buckets of HF-named tensors,
and, when the engine shares the GPUs with training (colocated), releases and resumes the engine's
memory by tag: ``weights`` and ``kv_cache``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from megatron_prism.registry import Registry

if TYPE_CHECKING:
    from megatron_prism.rollout.placement import EnginePlacement

MemoryTag = Literal["weights", "kv_cache"]
MEMORY_TAGS: tuple[MemoryTag, ...] = ("weights", "kv_cache")
FinishReason = Literal["stop", "length"]


@dataclass
class GenerationRequest:
    """One prompt. ``prompt_ids`` already contain the expanded image pads (see data.processing)."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    request_id: str = ""


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt (a GRPO group)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 128
    stop_ids: Sequence[int] = ()
    seed: int = 0
    # Tokens never to sample (their probability is moved to the others): e.g. the vision
    # placeholders, and the padded ids of a vocabulary larger than its tokenizer.
    banned_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"n ({self.n}) and max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"bad sampling settings: temperature {self.temperature}, top_p {self.top_p}, "
                             f"top_k {self.top_k} (use -1 for off)")


@dataclass
class GenerationResult:
    request_id: str
    sample_index: int  # 0..n-1 within its request
    response_ids: list[int]
    logprobs: list[float]  # the engine's log-prob of each response token under the sampling distribution's logits
    finish_reason: FinishReason
    extra: dict = field(default_factory=dict)


WeightBucket = Sequence[tuple[str, torch.Tensor]]


class RolloutEngine(abc.ABC):
    """What every engine provides (embedded, SGLang, vLLM).

    ``spmd``: every rank of the engine group holds its own share of the engine and the ranks of
    one engine TP group call ``generate`` with the same prompts (vLLM's ``external_launcher``);
    otherwise the group's leader alone holds and drives it (the engine spawns its own TP workers).
    """

    spmd: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def launch(cls, config_dir: Path, placement: EnginePlacement, device: torch.device) -> RolloutEngine:
        """Start the engine from the config and tokenizer in ``config_dir`` with dummy weights
        (real ones come with the first ``update_weights``), placed as ``placement`` says."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationResult]:
        """``n`` results per request, grouped by request in request order."""

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable[WeightBucket], version: int | None = None) -> None:
        """Loads new weights, streamed as buckets of (HF name, full tensor)."""

    @abc.abstractmethod
    def release_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None: ...

    @abc.abstractmethod
    def resume_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None: ...

    @property
    def weight_version(self) -> int | None:
        """The version passed with the last complete ``update_weights`` (None before any)."""
        return None

    def shutdown(self) -> None:
        """Frees the engine; the default has nothing to free."""


ENGINES: Registry[type[RolloutEngine]] = Registry("rollout engine")
register_engine = ENGINES.register


def check_memory_tags(tags: Sequence[str]) -> None:
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise ValueError(f"unknown memory tags {unknown}; engines know {list(MEMORY_TAGS)}")
