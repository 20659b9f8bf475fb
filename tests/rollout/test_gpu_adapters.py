"""The SGLang and vLLM adapters.

On CPU there is no sglang or vllm, so :class:`RecordingSGLangDouble` and :class:`RecordingVLLMDouble`
stand in for ``sglang.Engine`` / ``vllm.LLM``. They are recording doubles: they record the calls
the adapters make and answer "ok"; they do not generate, hold memory or load weights. The CPU
tests check only what an adapter sends: the order of the colocated sync (release, resume weights,
k weight updates, resume KV cache, flush) and the buckets' sizes and contents (against the HF
checkpoint the policy was built from). Whether SGLang / vLLM accept those calls is for the
``gpu``-marked tests at the end, which run the real engines on the tiny model (skipped on CPU).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.rollout import ENGINES, GenerationRequest, SamplingParams
from megatron_prism.rollout import sglang_engine
from megatron_prism.rollout.sglang_engine import SGLangEngine
from megatron_prism.rollout.vllm_engine import VLLMEngine, load_weights_on_worker
from megatron_prism.rollout.weight_sync import export_hf_weights, sync_weights, tensor_bytes

BUCKET = 48 << 10


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
    """No sglang on CPU: payloads stay python objects instead of serialized CUDA-IPC handles."""
    monkeypatch.setattr(sglang_engine, "_sglang_codec", lambda: (_Meta, lambda payload: payload))


class RecordingSGLangDouble:
    """Records the calls an adapter makes on ``sglang.Engine``; does not generate or load anything."""

    def __init__(self, report_version: bool = True) -> None:
        self.calls: list[tuple] = []
        self.payloads: list[list] = []  # per update call: the per-TP-rank payload list
        self.version = "default"
        self.report_version = report_version

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tuple(tags)))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tuple(tags)))

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True, weight_version=None):
        self.calls.append(("update", load_format, flush_cache, weight_version))
        self.payloads.append(list(named_tensors))
        if weight_version is not None and self.report_version:
            self.version = weight_version
        return True, "recorded"

    def flush_cache(self):
        self.calls.append(("flush",))
        return True

    def get_weight_version(self):
        return self.version

    def tensors(self, update_index: int, tp_rank: int = 0) -> list[tuple[str, torch.Tensor]]:
        """Rebuild one update call's tensors from its flattened payload, as SGLang's loader would."""
        payload = self.payloads[update_index][tp_rank]
        flat = payload["flattened_tensor"]
        return [(m.name, flat[m.start_idx:m.end_idx].reshape(m.shape)) for m in payload["metadata"]]


class _RecordingWorker:
    """What ``collective_rpc`` hands its function: a worker whose model records load_weights."""

    def __init__(self, log: list) -> None:
        model = SimpleNamespace(load_weights=lambda weights: log.append([n for n, _ in weights]))
        self.model_runner = SimpleNamespace(model=model)


class RecordingVLLMDouble:
    """Records the calls an adapter makes on ``vllm.LLM``; does not generate or hold memory.
    ``collective_rpc`` runs the given function against a worker that records ``load_weights``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.loaded: list[list[str]] = []
        self.buckets: list[list] = []

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("rpc", getattr(method, "__name__", method)))
        self.buckets.append(args[0])
        return [method(_RecordingWorker(self.loaded), *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _hf_state(hf_dir) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="module")
def policy(tiny_dirs):
    from megatron_prism.models import build_policy

    return build_policy(tiny_dirs["a"]), read_hf_config(tiny_dirs["a"])


def _expected_bucket_sizes(model, hf_config) -> list[list[str]]:
    from megatron_prism.rollout.weight_sync import bucketize

    return [[n for n, _ in b] for b in bucketize(export_hf_weights(model, hf_config), BUCKET)]


# ---- SGLang -------------------------------------------------------------------------------------


def test_sglang_colocated_sync_order_and_buckets(policy, tiny_dirs, plain_codec):
    model, hf_config = policy
    expected = _expected_bucket_sizes(model, hf_config)
    assert len(expected) > 3
    double = RecordingSGLangDouble()
    engine = SGLangEngine(engine=double, tp_size=2)
    engine.release_memory()
    stats = sync_weights(engine, model, hf_config, BUCKET, version=3)

    k = len(expected)  # one dtype (fp32): one update per bucket
    assert double.calls[0] == ("release", ("weights", "kv_cache"))
    assert double.calls[1] == ("resume", ("weights",))
    updates = double.calls[2:2 + k]
    assert updates[:-1] == [("update", "flattened_bucket", False, None)] * (k - 1)
    assert updates[-1] == ("update", "flattened_bucket", False, "3")  # the version rides on the last call
    assert double.calls[2 + k:] == [("resume", ("kv_cache",)), ("flush",)]
    assert engine.weight_version == 3
    assert stats["buckets"] == k and stats["tensors"] == sum(map(len, expected)) and stats["gb_per_s"] > 0

    ref = _hf_state(tiny_dirs["a"])
    seen: dict[str, torch.Tensor] = {}
    for i, names in enumerate(expected):
        assert len(double.payloads[i]) == 2  # one payload per engine TP rank
        got = double.tensors(i)
        assert [n for n, _ in got] == names
        size = sum(tensor_bytes(t) for _, t in got)
        assert size <= BUCKET or len(got) == 1
        assert double.payloads[i][0]["flattened_tensor"].numel() * 4 == size  # one contiguous fp32 buffer
        seen.update(got)
    assert set(seen) == set(ref) and all(torch.equal(seen[n], t) for n, t in ref.items())


def test_sglang_update_without_release_flushes_at_once(plain_codec):
    double = RecordingSGLangDouble()
    engine = SGLangEngine(engine=double)
    bf16 = [("a", torch.ones(3, dtype=torch.bfloat16)), ("c", torch.zeros(2, dtype=torch.bfloat16))]
    bucket = [bf16[0], ("b", torch.arange(4.0)), bf16[1]]
    engine.update_weights([bucket], version=None)
    assert [c[0] for c in double.calls] == ["update", "update", "flush"]  # one update per dtype, then flush
    assert [n for n, _ in double.tensors(0)] == ["a", "c"]
    assert double.payloads[0][0]["flattened_tensor"].dtype == torch.bfloat16
    assert [n for n, _ in double.tensors(1)] == ["b"]
    engine.resume_memory()  # nothing released: no call, no second flush
    assert len(double.calls) == 3


def test_sglang_refuses_updates_into_released_weights_and_stale_versions(plain_codec):
    engine = SGLangEngine(engine=RecordingSGLangDouble())
    engine.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.update_weights([[("w", torch.ones(2))]], version=1)
    stale = SGLangEngine(engine=RecordingSGLangDouble(report_version=False))
    with pytest.raises(RuntimeError, match="weight version"):
        stale.update_weights([[("w", torch.ones(2))]], version=2)


# ---- vLLM ---------------------------------------------------------------------------------------


def test_vllm_colocated_sync_order_and_buckets(policy, tiny_dirs):
    model, hf_config = policy
    expected = _expected_bucket_sizes(model, hf_config)
    double = RecordingVLLMDouble()
    engine = VLLMEngine(llm=double, sleep_level=2)
    engine.release_memory()
    sync_weights(engine, model, hf_config, BUCKET, version=5)
    k = len(expected)
    assert double.calls == ([("sleep", 2), ("wake_up", ("weights",))] + [("rpc", "load_weights_on_worker")] * k
                            + [("wake_up", ("kv_cache",)), ("reset_prefix_cache",)])
    assert double.loaded == expected  # the rpc function handed every bucket to the model's load_weights
    ref = _hf_state(tiny_dirs["a"])
    for bucket in double.buckets:
        assert sum(tensor_bytes(t) for _, t in bucket) <= BUCKET or len(bucket) == 1
        assert all(torch.equal(t, ref[n]) for n, t in bucket)
    assert engine.weight_version == 5


def test_vllm_memory_tags():
    double = RecordingVLLMDouble()
    engine = VLLMEngine(llm=double)
    with pytest.raises(ValueError, match="together"):
        engine.release_memory(["kv_cache"])
    engine.release_memory()
    engine.release_memory()  # already asleep: no second call
    engine.resume_memory()
    assert double.calls == [("sleep", 1), ("wake_up", ("weights", "kv_cache"))]
    with pytest.raises(ValueError, match="unknown memory tags"):
        engine.resume_memory(["optimizer"])


def test_vllm_rpc_function_uses_get_model_when_present():
    loaded = []
    model = SimpleNamespace(load_weights=lambda weights: loaded.append(dict(weights)))
    worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: model))
    assert load_weights_on_worker(worker, [("x", torch.ones(1))]) == 1
    assert list(loaded[0]) == ["x"]


# ---- registration and missing packages ----------------------------------------------------------


def test_engines_are_registered():
    assert ENGINES.get("sglang") is SGLangEngine and ENGINES.get("vllm") is VLLMEngine


@pytest.mark.parametrize("cls,module,extra", [(SGLangEngine, "sglang", "[gpu]"), (VLLMEngine, "vllm", "[vllm]")])
def test_missing_package_or_cuda_is_a_clear_error(cls, module, extra, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ImportError, match=extra.replace("[", r"\[").replace("]", r"\]")):
        cls("/some/model")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(name=name) if name == module else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        cls("/some/model")


def test_constructing_here_without_the_packages_fails_clearly():
    """On this CPU machine (no sglang / vllm): the real constructors refuse with the extra's name."""
    for cls, module, extra in ((SGLangEngine, "sglang", "[gpu]"), (VLLMEngine, "vllm", "[vllm]")):
        if importlib.util.find_spec(module) is not None:
            continue  # installed (a GPU machine): covered by the test above and the gpu tests
        with pytest.raises(ImportError) as err:
            cls("/some/model")
        assert extra in str(err.value) and module in str(err.value)


# ---- real engines (GPU only) --------------------------------------------------------------------


def _text_requests() -> list[GenerationRequest]:
    return [GenerationRequest(prompt_ids=[5, 17, 42, 9], request_id="r0"),
            GenerationRequest(prompt_ids=[100, 3, 7], request_id="r1")]


def _check_results(results, n: int, max_new: int) -> None:
    assert [(r.request_id, r.sample_index) for r in results] == [(f"r{i}", s) for i in range(2) for s in range(n)]
    for r in results:
        assert 1 <= len(r.response_ids) <= max_new and len(r.logprobs) == len(r.response_ids)
        assert all(lp <= 0 and lp == lp for lp in r.logprobs) and r.finish_reason in ("stop", "length")


def _perturbed_policy(hf_dir):
    from megatron_prism.models import build_policy

    model = build_policy(hf_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("word_embeddings.weight"):
                p.mul_(-1.0)
    return model


@pytest.mark.gpu
def test_sglang_engine_on_the_tiny_model(tiny_dirs):
    engine = SGLangEngine(str(tiny_dirs["a"]), mem_fraction_static=0.2, dtype="float32", seed=1)
    try:
        greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
        before = engine.generate(_text_requests(), greedy)
        _check_results(before, 2, 6)
        engine.release_memory()
        stats = sync_weights(engine, _perturbed_policy(tiny_dirs["a"]), read_hf_config(tiny_dirs["a"]), 1 << 20,
                             version=7)
        assert engine.weight_version == 7 and stats["bytes"] > 0
        after = engine.generate(_text_requests(), greedy)
        _check_results(after, 2, 6)
        assert [r.logprobs for r in after] != [r.logprobs for r in before]
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_vllm_engine_on_the_tiny_model(tiny_dirs):
    engine = VLLMEngine(str(tiny_dirs["a"]), gpu_memory_utilization=0.2, dtype="float32", seed=1,
                        engine_kwargs={"enforce_eager": True})
    try:
        greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
        before = engine.generate(_text_requests(), greedy)
        _check_results(before, 2, 6)
        engine.release_memory()
        sync_weights(engine, _perturbed_policy(tiny_dirs["a"]), read_hf_config(tiny_dirs["a"]), 1 << 20, version=7)
        assert engine.weight_version == 7
        after = engine.generate(_text_requests(), greedy)
        _check_results(after, 2, 6)
        assert [r.logprobs for r in after] != [r.logprobs for r in before]
    finally:
        engine.shutdown()
