"""The vLLM rollout engine: a thin adapter from :class:`RolloutEngine` to a colocated ``vllm.LLM``.

vLLM is a GPU-only, optional dependency (the ``[vllm]`` extra) and is imported lazily: this module
imports anywhere, constructing the adapter without vllm or CUDA fails at once with the fix in the
message, and the ``vllm.LLM`` is started on first use.

How the interface maps onto vLLM's offline API:

* ``generate`` -> ``LLM.generate(prompts, vllm.SamplingParams(...))`` with one prompt per request:
  ``{"prompt_token_ids": prompt_ids}`` plus, for images, ``multi_modal_data={"image":
  {"pixel_values": ..., "image_grid_thw": ...}}`` (pre-processed inputs; ``prompt_ids`` already hold
  the expanded image pads). ``n``/``temperature``/``top_p``/``top_k``/``max_new_tokens``/
  ``stop_ids``/``seed`` -> ``n``/``temperature``/``top_p``/``top_k``/``max_tokens``/
  ``stop_token_ids``/``seed``, with ``logprobs=0`` (the sampled token's log-prob only) and
  ``detokenize=False``. Back: each ``CompletionOutput`` (sorted by ``index``) gives ``token_ids``,
  ``logprobs[i][token_ids[i]].logprob`` and ``finish_reason`` (``stop``/``length``). The engine is
  started with ``logprobs_mode="processed_logprobs"`` (vLLM >= 0.10.2) so that the log-probs are
  those of the sampling distribution (after temperature / top-p / top-k), as the interface says.
* ``release_memory`` -> ``LLM.sleep(level=sleep_level)``: vLLM releases weights and KV cache
  together, so only a release of both tags is accepted. Level 1 keeps a CPU copy of the weights,
  level 2 drops them (cheaper when a full weight update follows anyway).
* ``resume_memory(tags)`` -> ``LLM.wake_up(tags=[...])`` for the released tags among ``tags``
  (``"weights"`` first in the colocated sync, so the KV cache is only allocated after the update).
* ``update_weights(buckets, version)`` -> per bucket, ``LLM.collective_rpc(fn, args=(bucket,))``
  where ``fn(worker, bucket)`` calls the worker's ``model_runner`` model ``load_weights(bucket)``
  (HF names; vLLM's Qwen3-VL loader maps them and skips ``lm_head`` when tied). With the in-process
  executor (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` or the ``external_launcher`` backend) this is a
  direct call on the same device; with worker processes the bucket is pickled to each worker.
  The prefix cache is reset afterwards (``reset_prefix_cache``), or once the KV cache is resumed.
  vLLM keeps no weight version, so the adapter keeps it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

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
from megatron_prism.rollout.sglang_engine import require_gpu_package


def load_weights_on_worker(worker: Any, named_tensors: list) -> int:
    """Runs inside each vLLM worker (through ``collective_rpc``): loads HF-named tensors into
    the worker's model. Module-level so that vLLM can pickle it by reference."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(weights=list(named_tensors))
    return len(named_tensors)


@register_engine("vllm")
class VLLMEngine(RolloutEngine):
    """A colocated vLLM engine behind the rollout interface (see the module docstring).

    ``engine_kwargs`` go to ``vllm.LLM`` over the defaults built here (a value of None removes a
    default, e.g. ``{"logprobs_mode": None}`` for vLLM releases without it); ``llm`` replaces the
    ``vllm.LLM`` altogether (an already started one, or a test double that records calls).
    """

    def __init__(
        self,
        model_path: str = "",
        *,
        tp_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "bfloat16",
        seed: int = 0,
        sleep_level: int = 1,
        engine_kwargs: dict | None = None,
        llm: Any = None,
    ) -> None:
        if llm is None:
            require_gpu_package("vllm", "vllm", "VLLMEngine")
            if not model_path:
                raise ValueError("VLLMEngine needs model_path (a HF directory) when no llm is given")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (offload weights to CPU) or 2 (discard them), got {sleep_level}")
        self.sleep_level = sleep_level
        kwargs: dict[str, Any] = dict(
            model=str(model_path), tensor_parallel_size=tp_size, gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype, seed=seed, enable_sleep_mode=True, skip_tokenizer_init=True,
            logprobs_mode="processed_logprobs",
        )
        kwargs.update(engine_kwargs or {})
        self._kwargs = {k: v for k, v in kwargs.items() if v is not None}
        self._llm = llm
        self._released: set[str] = set()
        self._needs_reset = False
        self._version: int | None = None

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM``, started on first use."""
        if self._llm is None:
            import vllm

            self._llm = vllm.LLM(**self._kwargs)
        return self._llm

    @property
    def weight_version(self) -> int | None:
        return self._version

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationResult]:
        if self._released:
            raise RuntimeError(f"generate called while {sorted(self._released)} are released; resume_memory() first")
        import vllm

        params = vllm.SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop_token_ids=list(sampling.stop_ids), seed=sampling.seed,
            logprobs=0, detokenize=False,
        )
        prompts = []
        for req in requests:
            prompt: dict[str, Any] = {"prompt_token_ids": list(req.prompt_ids)}
            if req.pixel_values is not None:
                prompt["multi_modal_data"] = {"image": {"pixel_values": req.pixel_values,
                                                        "image_grid_thw": req.image_grid_thw}}
            prompts.append(prompt)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for req, out in zip(requests, outputs):
            for sample in sorted(out.outputs, key=lambda c: c.index):
                ids = [int(t) for t in sample.token_ids]
                if sample.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished request {req.request_id!r} with {sample.finish_reason!r}")
                results.append(GenerationResult(
                    request_id=req.request_id, sample_index=sample.index, response_ids=ids,
                    logprobs=[float(step[tok].logprob) for step, tok in zip(sample.logprobs, ids)],
                    finish_reason=sample.finish_reason, extra={"stop_reason": sample.stop_reason},
                ))
        return results

    def release_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None:
        check_memory_tags(tags)
        if set(tags) != set(MEMORY_TAGS):
            raise ValueError(f"vLLM's sleep releases weights and KV cache together; release both {list(MEMORY_TAGS)}, "
                             f"not {list(tags)}")
        if not self._released:
            self.llm.sleep(level=self.sleep_level)
            self._released = set(MEMORY_TAGS)

    def resume_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None:
        check_memory_tags(tags)
        todo = [t for t in MEMORY_TAGS if t in tags and t in self._released]
        if todo:
            self.llm.wake_up(tags=todo)
            self._released.difference_update(todo)
        if self._needs_reset and "kv_cache" not in self._released:
            self._reset()

    def _reset(self) -> None:
        self.llm.reset_prefix_cache()
        self._needs_reset = False

    def update_weights(self, buckets: Iterable[WeightBucket], version: int | None = None) -> None:
        if "weights" in self._released:
            raise RuntimeError("update_weights called while the engine's weights are released; "
                               "resume_memory(['weights']) first")
        llm = self.llm
        for bucket in buckets:
            llm.collective_rpc(load_weights_on_worker, args=(list(bucket),))
        self._version = version
        self._needs_reset = True
        if "kv_cache" not in self._released:
            self._reset()

    def shutdown(self) -> None:
        self._llm = None
