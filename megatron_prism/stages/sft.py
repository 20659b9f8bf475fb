"""SFT: packed multimodal demonstrations, loss on response tokens only.

Each step takes one global batch of records, turns them into demonstrations (prompt + response,
labels on the response), packs them into rows of ``data.max_seq_len`` tokens with per-sample
isolation, and runs one forward-backward over the rows through megatron's schedule. The loss is the
mean NLL over all response tokens of the global batch (token-mean with global counts), so it does
not depend on how the rows fall into micro-batches or data-parallel ranks.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from megatron_prism.algorithms.aggregation import GlobalCounts, aggregate
from megatron_prism.data.loader import load_split
from megatron_prism.data.packing import VisionTokens, pack_demonstrations
from megatron_prism.data.processing import IGNORE_INDEX, DemonstrationInputs
from megatron_prism.data.records import RecordError, reason_of
from megatron_prism.parallel.devices import host_group
from megatron_prism.stages.common import evaluation_at_start, input_processor, run_evaluation
from megatron_prism.training.checkpoint import latest_checkpoint
from megatron_prism.training.faults import pause_point
from megatron_prism.training.loop import (StageContext, StageResult, Throughput, checkpoint_or_stop, final_figures,
                                          save, start_or_resume)
from megatron_prism.training.metrics import progress
from megatron_prism.training.runtime import MicroBatch, step_figures

log = logging.getLogger(__name__)


def _rows_to_micro_batches(rows) -> list[MicroBatch]:
    return [
        MicroBatch(
            {"input_ids": r.input_ids, "targets": r.targets, "attention_mask": r.attention_mask,
             "position_ids": r.position_ids, "pixel_values": r.pixel_values, "image_grid_thw": r.image_grid_thw,
             "cu_seqlens": r.cu_seqlens},
            num_tokens=int((r.targets != IGNORE_INDEX).sum()),
        )
        for r in rows
    ]


def _global_tokens(micro_batches: list[MicroBatch]) -> float:
    local = torch.tensor([sum(mb.num_tokens for mb in micro_batches)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(local, group=host_group("data_parallel"))  # host bookkeeping: a gloo group
    return float(local)


def run_sft(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    started = time.time()
    records, skips = load_split(ctx.split_path("sft"), "sft", strict=not cfg.data.lenient,
                                image_check_workers=cfg.data.image_check_workers)
    steps = ctx.stage.steps
    state = start_or_resume(ctx, records, total_steps=steps)
    skips.load_state_dict(state.extra.get("skips"))  # counted once, across a resume too
    runtime = state.runtime
    processor = input_processor(runtime.source, cfg.data)
    hf = runtime.hf_config
    vision = VisionTokens(hf.image_token_id, hf.video_token_id, hf.vision_config.spatial_merge_size)
    multiple = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    metrics_at_start = state.extra.get("eval_before")
    if metrics_at_start is None and ctx.stage.eval_every > 0:
        metrics_at_start = evaluation_at_start(ctx, runtime, processor)
        state.extra["eval_before"] = metrics_at_start

    bar = progress(steps, state.step, "sft", every=cfg.run.log_every)
    last: dict[str, float] = dict(state.extra.get("final", {}))  # a stage resumed at its last step still reports them
    while state.step < steps:
        timer = Throughput()
        examples: list[DemonstrationInputs] = []
        for record in state.loader.next_batch():
            try:
                examples.append(processor.demonstration(record))
            except RecordError as err:
                if not cfg.data.lenient:
                    raise
                skips.skip(reason_of(err), str(err), key=record.id)
        rows = pack_demonstrations(examples, cfg.data.max_seq_len, vision, pad_id=processor.pad_id,
                                   pad_to_multiple_of=multiple, dense_mask=runtime.packed_layout == "mask")
        micro_batches = _rows_to_micro_batches(rows)
        counts = GlobalCounts(tokens=_global_tokens(micro_batches), seqs=1.0)
        timer.lap("prepare")

        def loss_fn(out, tensors):
            mask = tensors["targets"] != IGNORE_INDEX
            loss = aggregate(-out.logp, mask, "token-mean", counts)
            return loss, {"nll_share": float(loss.detach())}

        runtime.train()
        runtime.optimizer.zero_grad()
        reduced = runtime.run(micro_batches, loss_fn)
        result = runtime.optimizer.step()
        pause_point("sft.step")
        timer.lap("train")
        state.step += 1
        # the NLL from the last pipeline stage, summed over data-parallel shares
        nll = step_figures({"loss": sum(r["nll_share"] for r in reduced)} if reduced else {})
        last = {"loss": nll.get("loss", float("nan")),
                "grad_norm": result.grad_norm, "lr": result.lr, "rows": len(rows),
                "skipped_records": skips.total, **timer.scalars(int(counts.tokens))}
        ctx.metrics.log("sft", state.step, last)
        bar.step(last)
        if ctx.stage.eval_every > 0 and state.step % ctx.stage.eval_every == 0 and state.step < steps:
            ctx.metrics.log("sft", state.step, run_evaluation(ctx, runtime, processor, label="during"))
        state.extra["final"] = final_figures(last)
        state.extra["skips"] = skips.state_dict()
        checkpoint_or_stop(ctx, state, steps, loss=last["loss"] if reduced else None)
    bar.close()
    final = latest_checkpoint(ctx.checkpoint_root) or save(ctx, state)
    after = run_evaluation(ctx, runtime, processor, label="after") if ctx.stage.eval_every > 0 else {}
    return StageResult(
        stage="sft", checkpoint=str(final), steps=state.step,
        wall_seconds=time.time() - started,
        metrics={"final": last, "eval_before": metrics_at_start or {}, "eval_after": after,
                 "skipped_records": dict(skips.counts)},
    )
