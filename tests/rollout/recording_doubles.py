"""Recording doubles of ``sglang.Engine`` (0.5.23) and ``vllm.LLM`` (0.33.0), shared by the adapter
and client tests. They record the calls an adapter makes and answer "ok"; they do not generate,
hold memory or load weights, and stand in for nothing but the call sequence."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from megatron_prism.rollout import sglang_engine


@dataclass
class _Meta:
    """What SGLang's FlattenedTensorMetadata carries (the CPU tests' stand-in for it)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


@pytest.fixture
def plain_codec(monkeypatch):
    """No sglang on CPU: payloads stay python objects instead of serialized CUDA-IPC handles
    (each "serialization" a fresh copy of the payload dict, as each real one is a blob of its own)."""
    monkeypatch.setattr(sglang_engine, "_sglang_codec", lambda: (_Meta, lambda payload: dict(payload)))


class RecordingSGLangDouble:
    """Records the calls an adapter makes on ``sglang.Engine`` (0.5.23's signatures); does not
    generate or load anything. Like SGLang's scheduler it keeps a set of released tags and
    refuses to resume a tag that is not released (``offload_tags.remove``)."""

    ALL = ("weights", "kv_cache", "cuda_graph")

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.payloads: list[list] = []  # per update call: the per-TP-rank payload list
        self.offloaded: set[str] = set()
        self.generate_kwargs: dict = {}

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", None if tags is None else tuple(tags)))
        self.offloaded.update(self.ALL if not tags else tags)

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", None if tags is None else tuple(tags)))
        for t in (self.ALL if not tags else tags):
            self.offloaded.remove(t)  # KeyError, as in SGLang, for a tag that is not released

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update", load_format, flush_cache))
        self.payloads.append(list(named_tensors))
        return True, "recorded"

    def flush_cache(self):
        self.calls.append(("flush",))
        return True

    def generate(self, **kwargs):
        self.calls.append(("generate",))
        self.generate_kwargs = kwargs
        return [{"meta_info": {"output_token_logprobs": [(-0.5, 7, None)], "finish_reason": {"type": "length"}}}
                for _ in kwargs["input_ids"]]

    def tensors(self, update_index: int, tp_rank: int = 0) -> list[tuple[str, torch.Tensor]]:
        """Rebuild one update call's tensors from its payload as 0.5.23's
        ``FlattenedTensorBucket.reconstruct_tensors`` does (uint8 buffer, byte offsets)."""
        payload = self.payloads[update_index][tp_rank]
        flat = payload["flattened_tensor"]
        assert flat.dtype == torch.uint8
        return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in payload["metadata"]]


class RecordingVLLMDouble:
    """Records the calls an adapter makes on an in-process ``vllm.LLM``; does not generate or hold
    memory. Its in-process model (reached the way 0.33's uniproc executor nests it) records the
    buckets handed to ``load_weights``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.buckets: list[list] = []
        self.prompts: list = []
        model = SimpleNamespace(load_weights=self._load)
        runner = SimpleNamespace(get_model=lambda: model)
        worker = SimpleNamespace(model_runner=runner)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=worker)))

    def _load(self, weights):
        self.calls.append(("load_weights",))
        self.buckets.append(list(weights))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
