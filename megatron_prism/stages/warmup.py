"""WARMUP: the discriminator learns to rank the teacher demonstration above the SFT policy's
response to the same alignment prompt, part by part, before the game starts.

One step: ``global_batch_size`` align prompts -> the frozen policy samples one response each
(embedded engine, ``rollout.temperature``, seeded by step) -> pairs (teacher demonstration, policy
response) -> one AdamW step of the Bradley-Terry loss + the MoE load-balancing loss
(``discriminator.aux_loss_coef``) with ``warmup_lr`` (cosine, ``warmup_lr_warmup_ratio`` warm-up).

The policy is unchanged: the result's checkpoint is the stage's source; the trained discriminator
is handed to ALIGN as the pipeline artifact ``discriminator``.

Where this differs from PRISM's warm-up (moe/train_moe_vl_warmup_fast.py): PRISM first writes a
dataset of policy responses offline and then trains on caption and cot pairs as separate rows; here
responses are sampled on the fly per step (a resumed run samples the same ones: the seed is a
function of the step) and both parts of a pair are scored in one forward (isolated parts, see
``models.discriminator.batch``), which is the same score PRISM's separate forwards compute.
"""

from __future__ import annotations

import logging
import time

from megatron_prism.data.loader import ShardedLoader, load_split
from megatron_prism.stages.common import input_processor, make_client
from megatron_prism.stages.discriminator_common import (
    ARTIFACT, heldout_eval, pair_loss, pairs_per_micro_batch, sample_pairs, split_heldout, starting_discriminator,
    train_figures,
)
from megatron_prism.stages.policy_update import rollout_seed
from megatron_prism.training import preemption
from megatron_prism.training.checkpoint import choose_resume, latest_checkpoint
from megatron_prism.training.discriminator_runtime import DiscriminatorRuntime, optimizer_config
from megatron_prism.training.faults import pause_point
from megatron_prism.training.loop import StageContext, StageResult, Throughput, final_figures
from megatron_prism.training.metrics import progress
from megatron_prism.training.optimizer import TrainingDiverged
from megatron_prism.training.runtime import PolicyRuntime

log = logging.getLogger(__name__)


def run_warmup(ctx: StageContext) -> StageResult:
    cfg, d = ctx.cfg, ctx.cfg.discriminator
    started = time.time()
    records, skips = load_split(ctx.split_path("align"), "align", strict=not cfg.data.lenient,
                                image_check_workers=cfg.data.image_check_workers)
    train, heldout = split_heldout(records)
    steps = ctx.stage.steps
    policy = PolicyRuntime.build(ctx.source, cfg.model, cfg.parallel, None, total_steps=1, seed=cfg.run.seed,
                                 trainable=False)
    processor = input_processor(policy.source, cfg.data)
    loader = ShardedLoader(train, ctx.stage.global_batch_size, seed=cfg.data.seed + 3, dp_rank=ctx.dp_rank,
                           dp_size=ctx.dp_size)
    latest = choose_resume(ctx.checkpoint_root, resume_from=ctx.resume_from)
    optim = optimizer_config(cfg, "warmup", steps)
    source = latest / "model" if latest else starting_discriminator(ctx)
    disc = DiscriminatorRuntime.build(source, cfg, processor.tokenizer, pad_id=processor.pad_id, optim=optim,
                                      total_steps=steps, seed=cfg.run.seed + 3)
    step, extra = 0, {}
    if latest is not None:
        trainer = disc.load_state(latest)
        loader.load_state_dict(trainer["loader"])
        step, extra = int(trainer["step"]), trainer.get("extra", {})
        log.info("warmup: resumed from %s (step %d)", latest, step)
        skips.load_state_dict(extra.get("skips"))  # counted once, across a resume too
    client = make_client(ctx, policy)
    client.sync(policy)  # the policy is frozen: one sync for the whole stage
    before = extra.get("heldout_before")
    pairs = None
    if before is None:
        before, pairs = heldout_eval(ctx, disc, processor, client, policy.hf_config, heldout, label="before")
        extra["heldout_before"] = before

    def checkpoint():
        """The discriminator at ``step``, only when healthy (no skip streak, finite weights: a save
        during a NaN streak would poison the resume); None when not saved."""
        if not disc.healthy():
            log.warning("warmup step %d: not saved (skip streak or non-finite weights)", step)
            return None
        return disc.save(ctx.checkpoint_root, step, {"stage": "warmup", "loader": loader.state_dict(), "extra": extra})

    bar = progress(steps, step, "warmup", every=cfg.run.log_every)
    last: dict[str, float] = dict(extra.get("final", {}))  # a stage resumed at its last step still reports them
    while step < steps:
        timer = Throughput()
        batch = loader.next_batch()
        _, results, teachers, policies = sample_pairs(ctx, processor, client, policy.hf_config, batch, n=1,
                                                      seed=rollout_seed(cfg.run.seed, 3, step, ctx.dp_rank), skips=skips)
        timer.lap("rollout")
        batches = disc.pair_batches(teachers, policies, pairs_per_micro_batch(cfg, len(policies)))
        loss_fn = pair_loss(batches, score_l2=d.warmup_score_l2, part_reduction=d.warmup_part_reduction,
                            score_clip=None, fallback_coef=cfg.align.no_valid_fallback_coef)
        result, reduced = disc.train_step(batches, loss_fn, aux_loss=True)
        pause_point("warmup.step")
        timer.lap("train")
        step += 1
        tokens = sum(int(b.input_ids.numel()) for b in batches)
        last = {**train_figures(reduced), "disc/grad_norm": result.grad_norm, "disc/lr": result.lr,
                "response/invalid_rate": sum(not disc.finder.find(r.response_ids).valid for r in results) / max(len(results), 1),
                **disc.load_balance(), **timer.scalars(tokens)}
        ctx.metrics.log("warmup", step, last)
        bar.step(last)
        extra["final"] = final_figures(last)
        extra["skips"] = skips.state_dict()
        saved = step % ctx.stage.save_every == 0 or step == steps
        if saved:
            saved = checkpoint() is not None
        if preemption.should_stop():
            if not saved:
                checkpoint()
            raise preemption.Preempted("warmup", step, checkpoint=latest_checkpoint(ctx.checkpoint_root))
    bar.close()
    final = latest_checkpoint(ctx.checkpoint_root) or checkpoint()
    if final is None:
        raise TrainingDiverged(f"warmup ended at step {step} with a skip streak or NaN/inf weights and saved no "
                               "checkpoint; lower discriminator.warmup_lr or check the data")
    after, _ = heldout_eval(ctx, disc, processor, client, policy.hf_config, heldout, label="after", pairs=pairs)
    client.shutdown()
    return StageResult(stage="warmup", checkpoint=str(ctx.source), steps=step, wall_seconds=time.time() - started,
                       metrics={"final": last, "heldout_before": before, "heldout_after": after,
                                "skipped_records": dict(skips.counts),
                                "artifacts": {ARTIFACT: str(final / "model")}})
