"""Parts the stages share on top of ``training``: input processing, the rollout engine and its
weight sync, and held-out evaluation.

The rollout engine lives on the export-destination rank of each model-parallel group (TP rank 0
of the first pipeline stage, see ``rollout.weight_sync``); it generates for its data-parallel
replica and the results are broadcast to the other ranks of the model-parallel group, so every
rank continues with the same responses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_prism.config.schema import DataConfig
from megatron_prism.data import chat
from megatron_prism.data.images import settings_for_model
from megatron_prism.data.loader import load_split
from megatron_prism.data.processing import InputProcessor, load_tokenizer
from megatron_prism.data.records import Record, RecordError, reason_of
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.rewards import get_reward
from megatron_prism.rollout import ENGINES, GenerationRequest, GenerationResult, SamplingParams
from megatron_prism.rollout.weight_sync import is_export_destination, sync_weights

log = logging.getLogger(__name__)


def input_processor(model_dir: str | Path, data: DataConfig) -> InputProcessor:
    """The tokenizer of the model directory and its image settings (preprocessor_config.json, the
    vision tower's sizes, and the run's data.min_pixels / max_pixels when set)."""
    hf = read_hf_config(model_dir)
    vc = hf.vision_config
    images = settings_for_model(model_dir, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                temporal_patch_size=vc.temporal_patch_size, min_pixels=data.min_pixels,
                                max_pixels=data.max_pixels)
    processor = InputProcessor(load_tokenizer(model_dir), images, max_length=data.max_seq_len)
    processor.pad_id = processor.tokenizer.pad_token_id or 0
    return processor


def _broadcast_from_destination(obj: Any) -> Any:
    """Sends ``obj`` from the model-parallel group's export destination to its other ranks."""
    if not dist.is_initialized() or dist.get_world_size(ps.get_model_parallel_group()) == 1:
        return obj
    group = ps.get_model_parallel_group()
    src = dist.get_global_rank(group, 0)  # TP rank 0 of PP stage 0 is model-parallel rank 0
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class RolloutClient:
    """The stages' handle on the engine: weight sync and generation shared over the MP group.

    The embedded engine is created at the first sync from the streamed weights themselves (it
    needs only the config directory), so it works from any checkpoint. Server engines (SGLang,
    vLLM) start from HF weights on disk, ``weights_dir``, and are then updated in place.
    """

    def __init__(self, engine_name: str, config_dir: Path, weights_dir: Path | None = None) -> None:
        self.engine_name = engine_name
        self.config_dir = Path(config_dir)
        self.weights_dir = weights_dir
        self.engine = None
        self.version = 0
        self.last_sync: dict[str, float] = {}

    def sync(self, runtime) -> dict[str, float]:
        """Stream the policy's current weights to the engine (collective over the MP group)."""
        self.version += 1
        if self.engine is None and self.engine_name == "embedded":
            from megatron_prism.rollout.weight_sync import export_hf_weights

            start = time.perf_counter()
            weights = {n: t.detach().clone() for n, t in export_hf_weights(runtime.chunks, runtime.hf_config,
                                                                             dst_rank_only=True)}
            if is_export_destination():
                # Building the engine's model draws random initial weights (then replaced): keep
                # that off the training RNG, or a resumed run, which creates its engine later than
                # the uninterrupted one, would draw different dropout masks afterwards.
                with torch.random.fork_rng(devices=[]):
                    self.engine = ENGINES.get("embedded")(weights, config=self.config_dir)
            self.last_sync = {"seconds": time.perf_counter() - start}
            return self.last_sync
        if self.engine is None and is_export_destination():
            if self.weights_dir is None:
                raise ValueError(f"rollout engine {self.engine_name!r} starts from HF weights on disk; set model.hf_dir")
            self.engine = ENGINES.get(self.engine_name)(self.weights_dir)
        self.last_sync = sync_weights(self.engine, runtime.chunks, runtime.hf_config, version=self.version)
        return self.last_sync

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationResult]:
        results = self.engine.generate(requests, sampling) if self.engine is not None else None
        return _broadcast_from_destination(results)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


def banned_ids(processor: InputProcessor, hf_config) -> list[int]:
    """Ids a response must not contain: the vision placeholders (a response is text) and the ids
    of a model vocabulary padded beyond its tokenizer (they decode to nothing)."""
    tok = processor.tokenizer
    vision = [tok.convert_tokens_to_ids(t) for t in (chat.IMAGE_PAD, chat.VIDEO_PAD, chat.VISION_START, chat.VISION_END)]
    return vision + list(range(len(tok), hf_config.text_config.vocab_size))


def prompt_requests(processor: InputProcessor, records: Sequence[Record], skips=None) -> tuple[list, list[Record]]:
    """Generation requests for records (unprocessable records are skipped and counted)."""
    requests, kept = [], []
    for rec in records:
        try:
            p = processor.prompt(rec)
        except RecordError as err:
            if skips is None:
                raise
            skips.skip(reason_of(err), str(err), key=rec.id)
            continue
        requests.append(GenerationRequest(p.input_ids.tolist(), p.pixel_values, p.image_grid_thw, rec.id))
        kept.append(rec)
    return requests, kept


def decode_responses(processor: InputProcessor, results: Sequence[GenerationResult]) -> list[str]:
    tok = processor.tokenizer
    return [tok.decode(r.response_ids, skip_special_tokens=False).replace(chat.IM_END, "") for r in results]


def score(reward_name: str, responses: Sequence[str], records: Sequence[Record]) -> list[Any]:
    fn = get_reward(reward_name)
    return [fn(resp, rec.answer or "", **{k: v for k, v in rec.meta.items() if k in ("options", "rel_tol")})
            for resp, rec in zip(responses, records)]


def _hf_weights_dir(ctx) -> Path | None:
    return Path(ctx.cfg.model.hf_dir) if ctx.cfg.model.hf_dir else None


def make_client(ctx, runtime) -> RolloutClient:
    return RolloutClient(ctx.cfg.rollout.engine, runtime.source, _hf_weights_dir(ctx))


def run_evaluation(ctx, runtime, processor: InputProcessor, *, label: str, client: RolloutClient | None = None,
                   max_items: int = 200) -> dict[str, float]:
    """Accuracy and format rate of the current policy on the held-out split, sampled as
    ``rollout.val_n`` / ``rollout.val_temperature`` say (greedy by default): accuracy is the mean
    over all samples, pass@n the fraction of items with at least one right sample."""
    ro = ctx.cfg.rollout
    records, skips = load_split(ctx.split_path("eval") if ctx.stage.name == "eval" else ctx.data_root / "eval",
                                "eval", strict=not ctx.cfg.data.lenient)
    records = records[:max_items]
    own_client = client is None
    client = client or RolloutClient(ro.engine, runtime.source, _hf_weights_dir(ctx))
    n = ro.val_n if ro.val_temperature > 0 else 1  # greedy samples would all be the same
    try:
        client.sync(runtime)
        requests, kept = prompt_requests(processor, records, skips)
        sampling = SamplingParams(n=n, temperature=ro.val_temperature, max_new_tokens=ro.max_new_tokens,
                                  stop_ids=[processor.im_end_id], seed=ctx.cfg.run.seed,
                                  banned_ids=banned_ids(processor, runtime.hf_config))
        results = client.generate(requests, sampling)
    finally:
        if own_client:
            client.shutdown()
    responses = decode_responses(processor, results)
    expanded = [rec for rec in kept for _ in range(n)]
    scored = score(ctx.cfg.algorithm.reward, responses, expanded)
    accuracy = [float(getattr(s, "details", {}).get("accuracy", float(s))) for s in scored]
    fmt = [float(get_reward("format")(r)) for r in responses]
    total = max(len(responses), 1)
    solved = [max(accuracy[i * n:(i + 1) * n], default=0.0) for i in range(len(kept))]
    out = {"eval/accuracy": sum(accuracy) / total, "eval/format": sum(fmt) / total,
           "eval/reward": sum(map(float, scored)) / total, "eval/items": float(len(kept)),
           f"eval/pass@{n}": sum(solved) / max(len(kept), 1)}
    log.info("%s eval (%s): accuracy %.3f, format %.3f over %d items x %d samples (T=%g)", ctx.stage.name, label,
             out["eval/accuracy"], out["eval/format"], len(kept), n, ro.val_temperature if n > 1 else 0.0)
    return out
