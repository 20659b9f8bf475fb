"""The SGLang rollout engine: a thin adapter from :class:`RolloutEngine` to a colocated ``sglang.Engine``.

SGLang is a GPU-only, optional dependency (the ``[gpu]`` extra), so it is imported lazily: this
module imports on any machine, and constructing the adapter without sglang or without CUDA fails
at once with a message that says what to install. The ``sglang.Engine`` itself is started on
first use (it takes GPU memory), from the model path and the settings given here.

How the interface maps onto SGLang's offline engine API:

* ``generate`` -> ``Engine.generate(input_ids=..., image_data=..., sampling_params=..., return_logprob=True)``.
  Each request is repeated ``n`` times in the batch (results come back in batch order, so
  request-major, sample-minor as the interface wants). Fields: ``prompt_ids`` -> ``input_ids``
  (already expanded image pads, so the engine runs with ``skip_tokenizer_init``);
  ``pixel_values`` + ``image_grid_thw`` -> one ``image_data`` item in SGLang's
  ``{"format": "processor_output", ...}`` form (pre-processed, not re-processed);
  ``temperature``/``top_p``/``top_k``/``stop_ids``/``max_new_tokens`` -> ``temperature``/``top_p``/
  ``top_k``/``stop_token_ids``/``max_new_tokens``. Back: ``meta_info.output_token_logprobs``
  (``(logprob, token_id, text)`` triples) gives ``response_ids`` and ``logprobs``;
  ``meta_info.finish_reason.type`` gives ``finish_reason`` (``abort`` is an error).
  The per-request ``seed`` is not passed (SGLang seeds from the engine's ``random_seed``).
* ``release_memory(tags)`` / ``resume_memory(tags)`` -> ``release_memory_occupation(tags=...)`` /
  ``resume_memory_occupation(tags=...)`` (needs ``enable_memory_saver=True``, set by default).
  The adapter tracks which tags are released so both calls are idempotent.
* ``update_weights(buckets, version)`` -> per bucket and dtype, a :class:`FlatBucket` handed to
  ``update_weights_from_tensor(..., load_format="flattened_bucket", flush_cache=False)``
  (serialised with SGLang's ``MultiprocessingSerializer``: on one node that is a CUDA-IPC
  handle, not a copy). The version travels with the last call as ``weight_version`` where the
  installed SGLang accepts it and is read back afterwards (``get_weight_version`` /
  ``get_model_info`` / ``get_server_info``); a mismatch is an error. The radix cache is flushed
  after the update, or, when the KV cache is released (colocated), right after it is resumed.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable

import torch

from megatron_prism.rollout.interface import (
    MEMORY_TAGS,
    GenerationRequest,
    GenerationResult,
    MemoryTag,
    RolloutEngine,
    SamplingParams,
    WeightBucket,
    check_memory_tags,
    register_engine,
)
from megatron_prism.rollout.weight_sync import flatten


def require_gpu_package(module: str, extra: str, who: str) -> None:
    """Fail early, with the fix in the message, when ``module`` or CUDA is missing."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{who} needs the '{module}' package, which is not installed. It is a GPU-only optional "
            f"dependency: pip install -e '.[{extra}]' on a CUDA machine (on CPU use the embedded engine)."
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"{who} needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                           "on CPU use the embedded engine.")


def _sglang_codec() -> tuple[type, Callable[[Any], Any]]:
    """SGLang's flattened-bucket metadata class and its payload serializer (lazy imports; the
    CPU tests replace this function, there being no sglang to import)."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError:  # older releases keep it next to the model runner
        from sglang.srt.model_executor.model_runner import FlattenedTensorMetadata
    from sglang.srt.utils import MultiprocessingSerializer

    try:  # lets CUDA-IPC handles be opened on another device of the node
        from sglang.srt.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()
    except ImportError:
        pass
    return FlattenedTensorMetadata, lambda payload: MultiprocessingSerializer.serialize(payload, output_str=True)


def _by_dtype(bucket: WeightBucket) -> list[list[tuple[str, torch.Tensor]]]:
    """A bucket split into one group per dtype, in first-seen order (SGLang's flattened buffer
    holds a single dtype)."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return list(groups.values())


def _with_last(items: Iterable) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` pairs; holds one item of look-ahead."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def _check_result(result: Any, what: str) -> None:
    """SGLang answers ``(success, message)`` (older) or an object / dict with ``success``."""
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
        ok, message = result[0], result[1] if len(result) > 1 else ""
    elif isinstance(result, dict) and "success" in result:
        ok, message = bool(result["success"]), result.get("message", "")
    elif hasattr(result, "success"):
        ok, message = bool(result.success), getattr(result, "message", "")
    else:
        return
    if not ok:
        raise RuntimeError(f"SGLang {what} failed: {message}")


@register_engine("sglang")
class SGLangEngine(RolloutEngine):
    """A colocated SGLang engine behind the rollout interface (see the module docstring).

    ``engine_kwargs`` go to ``sglang.Engine`` (ServerArgs names) over the defaults built here;
    ``engine`` replaces the ``sglang.Engine`` altogether (an already started engine, or a test
    double that records calls), in which case nothing is imported.
    """

    def __init__(
        self,
        model_path: str = "",
        *,
        tp_size: int = 1,
        mem_fraction_static: float = 0.5,
        dtype: str = "bfloat16",
        seed: int = 0,
        engine_kwargs: dict | None = None,
        engine: Any = None,
        pause_during_update: bool = False,
    ) -> None:
        if engine is None:
            require_gpu_package("sglang", "gpu", "SGLangEngine")
            if not model_path:
                raise ValueError("SGLangEngine needs model_path (a HF directory) when no engine is given")
        self.tp_size = tp_size
        self.pause_during_update = pause_during_update
        self._kwargs = dict(
            model_path=str(model_path), tp_size=tp_size, mem_fraction_static=mem_fraction_static, dtype=dtype,
            random_seed=seed, enable_memory_saver=True, skip_tokenizer_init=True,
        )
        self._kwargs.update(engine_kwargs or {})
        self._engine = engine
        self._released: set[str] = set()
        self._needs_flush = False
        self._version: int | None = None

    @property
    def engine(self) -> Any:
        """The ``sglang.Engine``, started on first use."""
        if self._engine is None:
            import sglang

            self._engine = sglang.Engine(**self._kwargs)
        return self._engine

    @property
    def weight_version(self) -> int | None:
        return self._version

    # ---- generation ------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationResult]:
        if self._released:
            raise RuntimeError(f"generate called while {sorted(self._released)} are released; resume_memory() first")
        params = {
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "max_new_tokens": sampling.max_new_tokens, "stop_token_ids": list(sampling.stop_ids),
        }
        input_ids, images = [], []
        for req in requests:
            image = None
            if req.pixel_values is not None:
                image = {"format": "processor_output", "pixel_values": req.pixel_values,
                         "image_grid_thw": req.image_grid_thw}
            for _ in range(sampling.n):
                input_ids.append(list(req.prompt_ids))
                images.append(image)
        outputs = self.engine.generate(
            input_ids=input_ids, image_data=images if any(i is not None for i in images) else None,
            sampling_params=[dict(params) for _ in input_ids], return_logprob=True,
        )
        results = []
        for i, out in enumerate(outputs):
            req = requests[i // sampling.n]
            meta = out["meta_info"]
            triples = meta["output_token_logprobs"]
            finish = meta["finish_reason"]
            reason = finish["type"] if isinstance(finish, dict) else str(finish)
            if reason not in ("stop", "length"):
                raise RuntimeError(f"SGLang finished request {req.request_id!r} with {finish!r}")
            results.append(GenerationResult(
                request_id=req.request_id, sample_index=i % sampling.n,
                response_ids=[int(t[1]) for t in triples], logprobs=[float(t[0]) for t in triples],
                finish_reason=reason, extra={"sglang_finish_reason": finish},
            ))
        return results

    # ---- memory ----------------------------------------------------------------------------

    def release_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None:
        check_memory_tags(tags)
        todo = [t for t in MEMORY_TAGS if t in tags and t not in self._released]
        if todo:
            self.engine.release_memory_occupation(tags=todo)
            self._released.update(todo)

    def resume_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None:
        check_memory_tags(tags)
        todo = [t for t in MEMORY_TAGS if t in tags and t in self._released]
        if todo:
            self.engine.resume_memory_occupation(tags=todo)
            self._released.difference_update(todo)
        if self._needs_flush and "kv_cache" not in self._released:
            self._flush()

    def _flush(self) -> None:
        _check_result(self.engine.flush_cache(), "flush_cache")
        self._needs_flush = False

    # ---- weights ---------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[WeightBucket], version: int | None = None) -> None:
        """Stream ``buckets`` into the engine (``weights`` must be resident, see the module docstring)."""
        if "weights" in self._released:
            raise RuntimeError("update_weights called while the engine's weights are released; "
                               "resume_memory(['weights']) first")
        engine = self.engine
        meta_cls, serialize = _sglang_codec()
        takes_version = version is not None and _accepts(engine.update_weights_from_tensor, "weight_version")
        paused = self.pause_during_update and hasattr(engine, "pause_generation")
        if paused:
            engine.pause_generation()
        try:
            groups = (group for bucket in buckets for group in _by_dtype(bucket))
            for group, last in _with_last(groups):
                flat = flatten(group)
                payload = {
                    "flattened_tensor": flat.buffer,
                    "metadata": [meta_cls(name=e.name, shape=torch.Size(e.shape), dtype=e.dtype, start_idx=e.offset,
                                          end_idx=e.offset + e.numel, numel=e.numel) for e in flat.entries],
                }
                blob = serialize(payload)
                extra = {"weight_version": str(version)} if takes_version and last else {}
                result = engine.update_weights_from_tensor(
                    named_tensors=[blob] * self.tp_size, load_format="flattened_bucket", flush_cache=False, **extra)
                _check_result(result, "update_weights_from_tensor")
                del flat, payload, blob
        finally:
            if paused:
                engine.continue_generation()
        if takes_version:
            reported = _reported_version(engine)
            if reported is not None and str(reported) != str(version):
                raise RuntimeError(f"SGLang reports weight version {reported!r} after an update to {version!r}")
        self._version = version
        self._needs_flush = True
        if "kv_cache" not in self._released:
            self._flush()

    def shutdown(self) -> None:
        if self._engine is not None and hasattr(self._engine, "shutdown"):
            self._engine.shutdown()
        self._engine = None


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _reported_version(engine: Any) -> str | None:
    """The weight version the engine reports, where this SGLang release exposes it."""
    if hasattr(engine, "get_weight_version"):
        return engine.get_weight_version()
    for getter in ("get_model_info", "get_server_info"):
        if hasattr(engine, getter):
            info = getattr(engine, getter)()
            if isinstance(info, dict) and "weight_version" in info:
                return info["weight_version"]
    return None
