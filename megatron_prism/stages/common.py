"""Parts the stages share on top of ``training``: input processing, the rollout client made from
the config (the client itself, its placement and lifecycle live in ``rollout.client``), and
held-out evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_prism.config.schema import DataConfig
from megatron_prism.data import chat
from megatron_prism.data.images import settings_for_model
from megatron_prism.data.loader import load_split
from megatron_prism.data.processing import InputProcessor, load_tokenizer
from megatron_prism.data.records import Record, RecordError, reason_of
from megatron_prism.data.synth.readouts import mechanism_rates
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.rewards import get_reward
from megatron_prism.rollout import GenerationRequest, GenerationResult, SamplingParams
from megatron_prism.rollout.client import EngineSettings, RolloutClient

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


def engine_settings(cfg) -> EngineSettings:
    """The client's settings from ``rollout.*`` (and the run's seed)."""
    ro = cfg.rollout
    return EngineSettings(engine=ro.engine, gpu_memory_fraction=ro.gpu_memory_fraction, tp=ro.tp,
                          port_base=ro.port_base, wait_timeout_s=ro.wait_timeout_s, seed=cfg.run.seed)


def make_client(ctx, runtime) -> RolloutClient:
    """The rollout client; its engine starts from the config and tokenizer of the runtime's
    checkpoint (``runtime.source``) with dummy weights, so no HF weights on disk are needed."""
    return RolloutClient(engine_settings(ctx.cfg), runtime.source)


def evaluation_at_start(ctx, runtime, processor: InputProcessor, *, client: RolloutClient | None = None,
                        label: str = "before") -> dict[str, float]:
    """The stage's "before" figures: the previous stage's "after" figures of the same weights when
    the pipeline handed them on (``ctx.source_heldout``; same run-wide settings and sampling seed,
    so sampling again would give the same numbers), else :func:`run_evaluation` now."""
    if ctx.source_heldout:
        log.info("%s eval (%s): the figures of %s from the stage before (accuracy %.3f)", ctx.stage.name, label,
                 ctx.source, ctx.source_heldout.get("eval/accuracy", float("nan")))
        return dict(ctx.source_heldout)
    return run_evaluation(ctx, runtime, processor, label=label, client=client)


def run_evaluation(ctx, runtime, processor: InputProcessor, *, label: str, client: RolloutClient | None = None,
                   max_items: int = 200) -> dict[str, float]:
    """Accuracy and format rate of the current policy on the held-out split, sampled as
    ``rollout.val_n`` / ``rollout.val_temperature`` say (greedy by default): accuracy is the mean
    over all samples, pass@n the fraction of items with at least one right sample; on the embedded
    task also the slip and caption-error rates (:mod:`megatron_prism.data.synth.readouts`). Sampled with the
    run-wide ``rollout`` (not a stage's own budget), so the figures of every stage compare."""
    ro = ctx.heldout_cfg.rollout
    records, skips = load_split(ctx.split_path("eval") if ctx.stage.name == "eval" else ctx.data_root / "eval",
                                "eval", strict=not ctx.cfg.data.lenient,
                                image_check_workers=ctx.cfg.data.image_check_workers)
    records = records[:max_items]
    own_client = client is None
    client = client or make_client(ctx, runtime)
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
    scored = score(ctx.heldout_cfg.algorithm.reward, responses, expanded)
    accuracy = [float(getattr(s, "details", {}).get("accuracy", float(s))) for s in scored]
    fmt = [float(get_reward("format")(r)) for r in responses]
    total = max(len(responses), 1)
    solved = [max(accuracy[i * n:(i + 1) * n], default=0.0) for i in range(len(kept))]
    out = {"eval/accuracy": sum(accuracy) / total, "eval/format": sum(fmt) / total,
           "eval/reward": sum(map(float, scored)) / total, "eval/items": float(len(kept)),
           f"eval/pass@{n}": sum(solved) / max(len(kept), 1)}
    # perception and reasoning apart: slip and caption-error rates (embedded task only)
    out.update(mechanism_rates(responses, expanded))
    log.info("%s eval (%s): accuracy %.3f, format %.3f over %d items x %d samples (T=%g)", ctx.stage.name, label,
             out["eval/accuracy"], out["eval/format"], len(kept), n, ro.val_temperature if n > 1 else 0.0)
    return out
