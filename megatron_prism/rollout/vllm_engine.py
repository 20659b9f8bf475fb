"""The vLLM rollout engine: a thin adapter from :class:`RolloutEngine` to an in-process ``vllm.LLM``
(written against the released vllm 0.33.0 sources; ``file:function`` below are theirs).

vLLM is a GPU-only, optional dependency (the ``[vllm]`` extra) and is imported lazily: this module
imports anywhere, constructing the adapter without vllm or CUDA fails at once with the fix in the
message, and the ``vllm.LLM`` is started on first use.

Placement (as verl's SPMD rollout does): every rank of an engine group runs its own ``vllm.LLM``
in-process with ``distributed_executor_backend="external_launcher"`` (``v1/executor/
uniproc_executor.py:ExecutorWithExternalLauncher``: device from ``LOCAL_RANK``, the ranks of one
vLLM TP group run the same prompts; it needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which
``launch`` sets). ``data_parallel_size`` is the number of engines, so that vLLM's world
(``config/parallel.py:ParallelConfig.__post_init__``: tp x dp) is torchrun's.

How the interface maps onto vLLM's offline API:

* ``launch`` -> ``vllm.LLM(model=config_dir, load_format="dummy", gpu_memory_utilization=
  rollout.gpu_memory_fraction, ...)``: the fraction is of total memory, as vLLM means it
  (``v1/worker/utils.py:request_memory``); the tokenizer is kept (vLLM's multimodal processor
  needs it).
* ``generate`` -> ``LLM.generate(prompts, vllm.SamplingParams(...))``, one ``TokensPrompt`` per
  request. Images go as PIL images rebuilt exactly from the request's pixel values
  (``data.images.unpatchify``) with a prompt whose image placeholders are *not* expanded (vLLM
  expands each ``<|image_pad|>`` itself), and ``mm_processor_kwargs`` min/max pixels that make
  the HF processor keep each image's size (transformers' ``smart_resize`` leaves a size that is
  a multiple of the factor and within the bounds). ``n``/``temperature``/``top_p``/``top_k``/
  ``max_new_tokens``/``stop_ids``/``seed``/``banned_ids`` -> ``n``/``temperature``/``top_p``/
  ``top_k``/``max_tokens``/``stop_token_ids``/``seed``/``logit_bias`` of -1e9, with ``logprobs=0``
  (the sampled token's log-prob) and ``detokenize=False``. The engine runs with
  ``logprobs_mode="processed_logprobs"`` so the log-probs are those of the sampling distribution.
* ``release_memory`` -> ``LLM.sleep(level)``: vLLM releases weights and KV cache together, so
  only a release of both tags is accepted (level 1 keeps a CPU copy of the weights, level 2,
  the default here, drops them: a full update follows anyway). ``resume_memory(tags)`` ->
  ``LLM.wake_up(tags=[...])`` for the released ones, ``weights`` first in the colocated sync;
  the scheduler resumes once both are back (``v1/engine/core.py:EngineCore.wake_up``).
* ``update_weights(buckets)`` -> the in-process model's ``load_weights(bucket)`` on the CUDA
  tensors themselves (``llm.llm_engine.model_executor.driver_worker.worker.model_runner
  .get_model()``; no ``collective_rpc`` with a pickled function, which vLLM refuses without
  ``VLLM_ALLOW_INSECURE_SERIALIZATION`` and which copies every tensor through the host). vLLM's
  Qwen3-VL loader maps the HF names and takes each rank's TP shard. The prefix cache is reset
  afterwards, or once the KV cache is resumed. vLLM keeps no weight version; the adapter does.
"""

from __future__ import annotations

import os
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
from megatron_prism.rollout.sglang_engine import BANNED_LOGIT_BIAS, require_gpu_package


def in_process_model(llm: Any) -> Any:
    """The ``nn.Module`` of an in-process ``vllm.LLM`` (uniproc / external_launcher executor)."""
    executor = llm.llm_engine.model_executor
    return executor.driver_worker.worker.model_runner.get_model()


def collapse_image_pads(prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Each run of ``<|image_pad|>`` -> one pad (vLLM expands the placeholder per image itself)."""
    out: list[int] = []
    for token in prompt_ids:
        if token == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(token))
    return out


@register_engine("vllm")
class VLLMEngine(RolloutEngine):
    """A colocated vLLM engine behind the rollout interface (see the module docstring).

    ``engine_kwargs`` go to ``vllm.LLM`` over the defaults built here (a value of None removes a
    default); ``llm`` replaces the ``vllm.LLM`` altogether (an already started one, or a
    recording double in the tests). ``images``: the ``data.images.ImageSettings`` used to rebuild
    request images (None: text-only requests)."""

    spmd = True

    def __init__(
        self,
        model_path: str = "",
        *,
        tp_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "bfloat16",
        seed: int = 0,
        sleep_level: int = 2,
        engine_kwargs: dict | None = None,
        llm: Any = None,
        image_token_id: int | None = None,
        images: Any = None,
    ) -> None:
        if llm is None:
            require_gpu_package("vllm", "vllm", "VLLMEngine")
            if not model_path:
                raise ValueError("VLLMEngine needs model_path (a HF directory) when no llm is given")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (offload weights to CPU) or 2 (discard them), got {sleep_level}")
        self.sleep_level = sleep_level
        self.image_token_id = image_token_id
        self.images = images
        kwargs: dict[str, Any] = dict(
            model=str(model_path), tensor_parallel_size=tp_size, gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype, seed=seed, enable_sleep_mode=True, logprobs_mode="processed_logprobs",
        )
        kwargs.update(engine_kwargs or {})
        self._kwargs = {k: v for k, v in kwargs.items() if v is not None}
        self._llm = llm
        self._released: set[str] = set()
        self._needs_reset = False
        self._version: int | None = None

    @classmethod
    def launch(cls, config_dir, placement, device) -> VLLMEngine:
        """This rank's in-process engine (external launcher), dummy weights, sized from total memory."""
        import torch

        from megatron_prism.data.images import settings_for_model
        from megatron_prism.models.qwen3vl.config import read_hf_config
        from megatron_prism.rollout.placement import check_free_memory

        require_gpu_package("vllm", "vllm", "VLLMEngine")
        free, total = torch.cuda.mem_get_info(device)
        check_free_memory(placement.memory_fraction, free, total)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # required by the external launcher
        world = int(os.environ.get("WORLD_SIZE", "1"))
        hf = read_hf_config(config_dir)
        vc = hf.vision_config
        images = settings_for_model(config_dir, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                    temporal_patch_size=vc.temporal_patch_size)
        return cls(str(config_dir), tp_size=placement.tp, gpu_memory_utilization=placement.memory_fraction,
                   seed=placement.seed, image_token_id=hf.image_token_id, images=images,
                   engine_kwargs=dict(load_format="dummy", distributed_executor_backend="external_launcher",
                                      data_parallel_size=max(world // placement.tp, 1)))

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

    def _sampling_params(self, sampling: SamplingParams) -> Any:
        import vllm

        return vllm.SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop_token_ids=list(sampling.stop_ids), seed=sampling.seed,
            logit_bias={int(t): BANNED_LOGIT_BIAS for t in sampling.banned_ids} or None,
            logprobs=0, detokenize=False,
        )

    def prompt(self, req: GenerationRequest) -> dict[str, Any]:
        """The ``TokensPrompt`` of one request (see the module docstring)."""
        if req.pixel_values is None:
            return {"prompt_token_ids": list(req.prompt_ids)}
        from megatron_prism.data.images import tokens_per_image, unpatchify

        if self.images is None or self.image_token_id is None:
            raise ValueError("VLLMEngine got an image request but knows no image settings (start it with launch)")
        grids = req.image_grid_thw.reshape(-1, 3)
        sizes = tokens_per_image(grids, self.images)
        pieces = req.pixel_values.split([int(g.prod()) for g in grids])
        pictures = [unpatchify(pv, g.tolist(), self.images) for pv, g in zip(pieces, grids)]
        areas = [p.width * p.height for p in pictures]
        if sum(1 for t in req.prompt_ids if t == self.image_token_id) != sum(sizes):
            raise ValueError(f"request {req.request_id!r}: its image pads do not match its images' grids")
        return {"prompt_token_ids": collapse_image_pads(req.prompt_ids, self.image_token_id),
                "multi_modal_data": {"image": pictures},
                "mm_processor_kwargs": {"min_pixels": min(areas), "max_pixels": max(areas)}}

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationResult]:
        if self._released:
            raise RuntimeError(f"generate called while {sorted(self._released)} are released; resume_memory() first")
        params = self._sampling_params(sampling)
        outputs = self.llm.generate([self.prompt(r) for r in requests], params, use_tqdm=False)
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
        model = in_process_model(self.llm)
        for bucket in buckets:
            model.load_weights(weights=list(bucket))
        self._version = version
        self._needs_reset = True
        if "kv_cache" not in self._released:
            self._reset()

    def shutdown(self) -> None:
        self._llm = None
