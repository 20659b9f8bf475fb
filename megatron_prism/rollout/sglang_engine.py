"""The SGLang rollout engine: a thin adapter from :class:`RolloutEngine` to a colocated ``sglang.Engine``
(written against the released sglang 0.5.23 sources; ``file:function`` below are theirs).

SGLang is a GPU-only, optional dependency (the ``[sglang]`` extra), so it is imported lazily: this
module imports on any machine, and constructing the adapter without sglang or without CUDA fails
at once with a message that says what to install. The ``sglang.Engine`` itself is started on
first use (it takes GPU memory), from the settings given here.

How the interface maps onto SGLang's offline engine API:

* ``launch(config_dir, placement)`` -> ``sglang.Engine(model_path=config_dir, load_format="dummy",
  base_gpu_id=<the leader's GPU>, tp_size=rollout.tp, port/nccl_port=<the engine's own>,
  mem_fraction_static=<rollout.gpu_memory_fraction rescaled, see rollout.placement>)``: the engine
  needs only the checkpoint's config and tokenizer; real weights come with the first sync.
* ``generate`` -> ``Engine.generate(input_ids=..., image_data=..., sampling_params=..., return_logprob=True)``.
  Each request is repeated ``n`` times in the batch (results come back in batch order, so
  request-major, sample-minor as the interface wants). ``pixel_values`` + ``image_grid_thw`` ->
  one ``image_data`` item in SGLang's ``{"format": "processor_output", ...}`` form.
  ``temperature``/``top_p``/``top_k``/``stop_ids``/``max_new_tokens`` -> the same-named fields
  (``stop_token_ids``); ``banned_ids`` -> ``logit_bias`` of -1e9 (``sampling/sampling_batch_info.py``
  adds it to the logits); ``seed`` -> a ``sampling_seed`` per row (honoured by SGLang when the
  engine runs with ``enable_deterministic_inference``, ``sampling_batch_info.py:from_schedule_batch``).
  Back: ``meta_info.output_token_logprobs`` (``(logprob, token_id, text)`` triples) gives
  ``response_ids`` and ``logprobs``; ``meta_info.finish_reason.type`` gives ``finish_reason``.
* ``release_memory()`` -> ``release_memory_occupation(tags=None)``: 0.5.23 has three tags
  (``srt/constants.py``: weights, kv_cache, cuda_graph) and None releases all of them
  (``scheduler_components/weight_updater.py:release_memory_occupation``). ``resume_memory(["weights"])``
  -> ``resume(["weights"])``; ``resume_memory(["kv_cache"])`` -> ``resume(["kv_cache", "cuda_graph"])``.
  SGLang's resume removes each tag from a set (a tag not released is a KeyError there), so the
  adapter tracks exactly what is released.
* ``update_weights(buckets, version)`` -> per bucket, one raw-byte :class:`FlatBucket` (SGLang's
  ``weight_sync/tensor_bucket.py:FlattenedTensorBucket`` layout: uint8 buffer, byte offsets),
  serialized once *per engine TP rank* (``tp_worker.py:deserialize_own_rank``: each rank
  deserializes only its own copy, or the producer's CUDA-IPC refcounts break) and handed to
  ``update_weights_from_tensor(..., load_format="flattened_bucket", flush_cache=False)``. The
  call returns when every rank has loaded the bucket; the buffer stays referenced until then, and
  torch's CUDA-IPC refcounting (``torch/multiprocessing/cuda_multiprocessing.md``: the sender
  keeps a block until the receiver has freed its handle) keeps its memory from being reused before
  the engine has read it. 0.5.23 takes no ``weight_version``; the adapter keeps the version. The
  radix cache is flushed after the update, or, when the KV cache is released, once it is resumed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
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
    CPU tests replace this function, there being no sglang to import). The torch reductions
    patch (``sglang/srt/utils/patch_torch.py``, where 0.5.23 keeps it) lets a CUDA-IPC handle be
    opened on another device of the node; a missing patch is an error, never skipped."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    monkey_patch_torch_reductions()
    return FlattenedTensorMetadata, lambda payload: MultiprocessingSerializer.serialize(payload, output_str=True)


BANNED_LOGIT_BIAS = -1e9  # added to a banned id's logit: its probability underflows to exactly 0
SGLANG_TAGS = ("weights", "kv_cache", "cuda_graph")  # sglang/srt/constants.py GPU_MEMORY_ALL_TYPES


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
            require_gpu_package("sglang", "sglang", "SGLangEngine")
            if not model_path:
                raise ValueError("SGLangEngine needs model_path (a HF directory) when no engine is given")
        self.tp_size = tp_size
        self.pause_during_update = pause_during_update
        self._kwargs = dict(
            model_path=str(model_path), tp_size=tp_size, mem_fraction_static=mem_fraction_static, dtype=dtype,
            random_seed=seed, enable_memory_saver=True,
        )
        self._kwargs.update(engine_kwargs or {})
        self._engine = engine
        self._released: set[str] = set()
        self._needs_flush = False
        self._version: int | None = None

    @classmethod
    def launch(cls, config_dir, placement, device) -> SGLangEngine:
        """An engine on GPUs ``placement.gpu_id ..`` + ``placement.tp`` with dummy weights, sized
        from the GPU's total memory (``rollout.placement.sglang_mem_fraction``)."""
        from megatron_prism.rollout.placement import sglang_mem_fraction

        require_gpu_package("sglang", "sglang", "SGLangEngine")
        free, total = torch.cuda.mem_get_info(placement.gpu_id)
        return cls(str(config_dir), tp_size=placement.tp, seed=placement.seed,
                   mem_fraction_static=sglang_mem_fraction(placement.memory_fraction, free, total),
                   engine_kwargs=dict(load_format="dummy", base_gpu_id=placement.gpu_id, port=placement.port,
                                      nccl_port=placement.nccl_port))

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
        if sampling.banned_ids:
            params["logit_bias"] = {str(int(t)): BANNED_LOGIT_BIAS for t in sampling.banned_ids}
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
            sampling_params=[dict(params, sampling_seed=_row_seed(sampling.seed, row)) for row in range(len(input_ids))],
            return_logprob=True,
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
        """Both interface tags: all of SGLang's memory (``tags=None``: weights, KV cache, CUDA
        graphs); ``["kv_cache"]`` alone: the KV cache and the CUDA graphs that address it."""
        check_memory_tags(tags)
        if set(tags) >= set(MEMORY_TAGS):
            todo = [t for t in SGLANG_TAGS if t not in self._released]
            if todo:
                self.engine.release_memory_occupation(tags=None if len(todo) == len(SGLANG_TAGS) else todo)
        else:
            todo = [t for t in _sglang_tags(tags) if t not in self._released]
            if todo:
                self.engine.release_memory_occupation(tags=todo)
        self._released.update(todo)

    def resume_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None:
        check_memory_tags(tags)
        todo = [t for t in _sglang_tags(tags) if t in self._released]
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
        paused = self.pause_during_update and hasattr(engine, "pause_generation")
        if paused:
            engine.pause_generation()
        try:
            for bucket in buckets:
                flat = flatten(bucket, as_bytes=True)
                payload = {
                    "flattened_tensor": flat.buffer,
                    "metadata": [meta_cls(name=e.name, shape=torch.Size(e.shape), dtype=e.dtype, start_idx=e.offset,
                                          end_idx=e.offset + e.numel * e.dtype.itemsize,
                                          numel=e.numel * e.dtype.itemsize) for e in flat.entries],
                }
                # one serialization per engine TP rank: each rank opens (and later closes) its own handle
                blobs = [serialize(payload) for _ in range(self.tp_size)]
                result = engine.update_weights_from_tensor(named_tensors=blobs, load_format="flattened_bucket",
                                                           flush_cache=False)
                _check_result(result, "update_weights_from_tensor")
                del flat, payload, blobs  # only now: every rank has loaded this bucket
        finally:
            if paused:
                engine.continue_generation()
        self._version = version
        self._needs_flush = True
        if "kv_cache" not in self._released:
            self._flush()

    def shutdown(self) -> None:
        if self._engine is not None and hasattr(self._engine, "shutdown"):
            self._engine.shutdown()
        self._engine = None


def _sglang_tags(tags: Sequence[str]) -> list[str]:
    """SGLang's tags for interface tags: the CUDA graphs go with the KV cache they address."""
    out = [t for t in ("weights", "kv_cache") if t in tags]
    return out + (["cuda_graph"] if "kv_cache" in tags else [])


def _row_seed(seed: int, row: int) -> int:
    """A distinct 63-bit seed for each row of a batch (the ``n`` copies of a prompt must differ)."""
    return (int(seed) * 1_000_003 + row) % (2**63)
