"""ALIGN: the black-box on-policy distillation game between the policy and the discriminator.

One step (PRISM's recipe, scripts/train/experiment/qwen3_vl_prism.sh):

1. the policy samples ``align.samples_per_prompt`` responses per align prompt (``rollout.temperature``);
2. the discriminator, in eval mode and without gradients, scores the caption and think+answer parts
   of every response and of its prompt's teacher demonstration; responses that break the format
   (no parts, :class:`PartFinder`) are invalid;
3. advantage ``prism_game``: group-normalised clipped part scores weighted by
   ``align.caption_weight``/``reasoning_weight``, minus ``invalid_penalty`` for invalid responses;
4. ``align.disc_steps_per_policy_step`` Bradley-Terry steps of the discriminator on the same batch
   (train mode: dropout and router noise on; ``align_lr``; score L2 ``discriminator.score_l2``;
   no load-balancing loss, as PRISM's ALIGN critic update has none), each policy response paired
   with its prompt's demonstration;
5. the policy update of :mod:`.policy_update` (the RLVR machinery, ``algorithm.loss`` etc.), weight
   sync to the engine at the start of the next step.

Steps 4 and 5 both use the scores of step 2, so their order does not change the result; PRISM
(verl) updates the critic first, as here.

Checkpoints: the policy's under ``checkpoints/`` (``training.loop.save``) and the discriminator's
under ``disc_checkpoints/`` at the same steps, the discriminator written first: a kill between the
two leaves a policy checkpoint whose step's discriminator checkpoint exists (the last two are
kept), and a resume loads the pair of the policy's step.

Held-out figures (the align split's held-out records, one response each, fixed seed):
``game_before`` (the starting policy judged by the starting discriminator), ``game_after`` (the
aligned policy judged by the *starting* discriminator: did the policy learn to earn higher part
scores from the judge it started against?) and ``game_after_final_disc`` (judged by the final one).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_prism.algorithms import compute_advantages
from megatron_prism.data.loader import load_split
from megatron_prism.stages.common import (decode_responses, evaluation_at_start, input_processor, make_client,
                                          run_evaluation, score)
from megatron_prism.stages.discriminator_common import (
    ARTIFACT, heldout_eval, pair_loss, pair_metrics, pairs_per_micro_batch, sample_pairs, split_heldout, split_scores,
    starting_discriminator, train_figures,
)
from megatron_prism.stages.policy_update import global_advantages, rollout_seed, update_metrics, update_policy
from megatron_prism.training import preemption
from megatron_prism.training.checkpoint import latest_checkpoint
from megatron_prism.training.discriminator_runtime import DiscriminatorRuntime, optimizer_config
from megatron_prism.training.loop import (StageContext, StageResult, Throughput, checkpoint_or_stop, final_figures,
                                          healthy, save, start_or_resume)
from megatron_prism.training.metrics import progress
from megatron_prism.training.optimizer import TrainingDiverged
from megatron_prism.training.runtime import PolicyRuntime

log = logging.getLogger(__name__)


def _judge(ctx: StageContext, path: Path, processor) -> DiscriminatorRuntime:
    """A frozen discriminator (scoring only)."""
    return DiscriminatorRuntime.build(path, ctx.cfg, processor.tokenizer, pad_id=processor.pad_id, optim=None,
                                      total_steps=1, seed=ctx.cfg.run.seed)


def run_align(ctx: StageContext) -> StageResult:
    if ctx.cfg.align.policy_reward == "verifiable":
        return _run_verifiable(ctx)
    cfg, d, game = ctx.cfg, ctx.cfg.discriminator, ctx.cfg.align
    started = time.time()
    steps = ctx.stage.steps
    disc_root = ctx.out_dir / "disc_checkpoints"
    # resume from the newest step whose policy and discriminator checkpoints both verify
    skips, heldout, state, processor, client, reference = _policy_side(ctx, companion=disc_root)
    runtime, hf = state.runtime, state.runtime.hf_config
    start_disc = Path(state.extra["disc_start"]) if "disc_start" in state.extra else \
        Path(ctx.artifacts.get(ARTIFACT) or starting_discriminator(ctx))
    state.extra["disc_start"] = str(start_disc)
    resume_disc = disc_root / f"step_{state.step:08d}" if state.step else None
    disc_steps = steps * game.disc_steps_per_policy_step
    disc = DiscriminatorRuntime.build(resume_disc / "model" if resume_disc else start_disc, cfg, processor.tokenizer,
                                      pad_id=processor.pad_id, optim=optimizer_config(cfg, "align", disc_steps),
                                      total_steps=disc_steps, seed=cfg.run.seed + 4)
    if resume_disc is not None:
        # The RNGs again, from the discriminator's rank file (saved at the same point as the
        # policy's): building the discriminator after the policy's restore reseeded and consumed them.
        disc.load_state(resume_disc, rng=True)
    if ctx.stage.eval_every > 0 and "eval_before" not in state.extra:
        state.extra["eval_before"] = evaluation_at_start(ctx, runtime, processor, client=client)
    if "game_before" not in state.extra:
        client.sync(runtime)
        state.extra["game_before"], _ = heldout_eval(ctx, disc, processor, client, hf, heldout, label="before",
                                                     prefix="game/")

    bar = progress(steps, state.step, "align", every=cfg.run.log_every)
    last: dict[str, float] = dict(state.extra.get("final", {}))  # a stage resumed at its last step still reports them
    n = game.samples_per_prompt
    while state.step < steps:
        timer = Throughput()
        runtime.train()
        client.sync(runtime)
        timer.lap("sync")
        requests, results, teachers, policies = sample_pairs(
            ctx, processor, client, hf, state.loader.next_batch(), n=n,
            seed=rollout_seed(cfg.run.seed, 4, state.step, ctx.dp_rank), skips=skips)
        timer.lap("rollout")
        batches = disc.pair_batches(teachers, policies, pairs_per_micro_batch(cfg, len(policies)))
        teacher_s, policy_s, valid, policy_valid = split_scores(disc.score(batches), batches)
        scored = pair_metrics(teacher_s, policy_s, valid, policy_valid, score_clip=game.score_clip,
                              weights=(game.caption_weight, game.reasoning_weight), invalid_offset=game.invalid_offset)
        group_ids = [i // n for i in range(len(results))]
        advantages = compute_advantages(
            "prism_game", policy_s.double(), group_ids, invalid=~policy_valid,
            weights=(game.caption_weight, game.reasoning_weight), invalid_penalty=game.invalid_penalty,
            invalid_offset=game.invalid_offset, score_clip=game.score_clip, eps=game.eps)
        timer.lap("score")
        loss_fn = pair_loss(batches, score_l2=d.score_l2, part_reduction=d.align_part_reduction,
                            score_clip=game.score_clip, fallback_coef=game.no_valid_fallback_coef)
        for _ in range(game.disc_steps_per_policy_step):
            disc_result, reduced = disc.train_step(batches, loss_fn, aux_loss=False)
        moe = disc.load_balance()
        timer.lap("disc")
        samples = [{"request": q, "result": r, "advantage": float(a)}
                   for q, r, a in zip(requests, results, advantages.tolist())]
        metrics_sum, result = update_policy(cfg, runtime, samples, reference, timer, pause="align.update")
        state.step += 1
        tokens = max(metrics_sum.get("tokens", 0.0), 1.0)
        last = {**scored, **train_figures(reduced), "disc/grad_norm": disc_result.grad_norm, "disc/lr": disc_result.lr,
                **moe, "advantage/mean": float(advantages.mean()), "advantage/std": float(advantages.std()),
                "response/length": sum(len(r.response_ids) for r in results) / max(len(results), 1),
                **update_metrics(cfg, metrics_sum, result), "sync/seconds": client.last_sync.get("seconds", 0.0),
                **timer.scalars(int(tokens))}
        ctx.metrics.log("align", state.step, last)
        bar.step(last)
        if ctx.stage.eval_every > 0 and state.step % ctx.stage.eval_every == 0 and state.step < steps:
            ctx.metrics.log("align", state.step, run_evaluation(ctx, runtime, processor, label="during", client=client))
        state.extra["final"] = final_figures(last)
        state.extra["skips"] = skips.state_dict()
        saved = None
        if state.step % ctx.stage.save_every == 0 or state.step == steps:
            saved = _save_game(ctx, state, disc, disc_root)
        if preemption.should_stop():
            if saved is None:
                saved = _save_game(ctx, state, disc, disc_root)
            raise preemption.Preempted("align", state.step, checkpoint=saved or latest_checkpoint(ctx.checkpoint_root))
    bar.close()
    final = latest_checkpoint(ctx.checkpoint_root) or _save_game(ctx, state, disc, disc_root)
    if final is None:
        raise TrainingDiverged(f"align ended at step {state.step} with a skip streak or NaN/inf weights and saved no "
                               "checkpoint; lower the learning rates or check the data")
    final_disc = disc_root / final.name / "model"
    client.sync(runtime)
    after_final, pairs = heldout_eval(ctx, disc, processor, client, hf, heldout, label="after, final disc",
                                      prefix="game/")
    judge = _judge(ctx, start_disc, processor)
    after, _ = heldout_eval(ctx, judge, processor, client, hf, heldout, label="after, starting disc", pairs=pairs,
                            prefix="game/")
    eval_after = run_evaluation(ctx, runtime, processor, label="after", client=client) if ctx.stage.eval_every > 0 else {}
    client.shutdown()
    return StageResult(stage="align", checkpoint=str(final), steps=state.step, wall_seconds=time.time() - started,
                       metrics={"final": last, "eval_before": state.extra.get("eval_before", {}),
                                "eval_after": eval_after, "game_before": state.extra["game_before"],
                                "game_after": after, "game_after_final_disc": after_final,
                                "skipped_records": dict(skips.counts), "artifacts": {ARTIFACT: str(final_disc)}})


def _save_game(ctx: StageContext, state, disc: DiscriminatorRuntime, disc_root: Path) -> Path | None:
    """Both halves of an ALIGN step, the discriminator first (see the module docstring), only when
    both are healthy (collective: no skip streak, finite loss and weights on every rank): a save
    during a NaN streak would poison the resume. Returns the policy checkpoint, None if not saved."""
    if not (healthy(state) and disc.healthy()):
        log.warning("align step %d: not saved (skip streak or non-finite weights)", state.step)
        return None
    disc.save(disc_root, state.step, {"stage": "align"})
    return save(ctx, state)


def _policy_side(ctx: StageContext, *, companion: Path | None = None):
    """What both ALIGN loops start from: the align split (skip counts restored), its training and
    held-out records, the policy's training state (resumed from the stage's newest checkpoint that
    verifies, with ``companion``'s of the same step), its processor, rollout client and the frozen
    reference when the KL term needs one. Returns (skips, heldout, state, processor, client,
    reference)."""
    cfg, alg = ctx.cfg, ctx.cfg.algorithm
    records, skips = load_split(ctx.split_path("align"), "align", strict=not cfg.data.lenient,
                                image_check_workers=cfg.data.image_check_workers)
    train, heldout = split_heldout(records)
    state = start_or_resume(ctx, train, total_steps=ctx.stage.steps * alg.ppo_epochs * alg.mini_batches,
                            seed_offset=2, companion=companion)
    skips.load_state_dict(state.extra.get("skips"))  # counted once, across a resume too
    processor = input_processor(state.runtime.source, cfg.data)
    client = make_client(ctx, state.runtime)
    reference = (PolicyRuntime.build(ctx.source, cfg.model, cfg.parallel, None, total_steps=1, seed=cfg.run.seed,
                                     trainable=False) if alg.kl_coef > 0 else None)
    return skips, heldout, state, processor, client, reference


def _run_verifiable(ctx: StageContext) -> StageResult:
    """``align.policy_reward: verifiable``, the same-compute control (arm ``rl-on-align-prompts``):
    the ALIGN stage's loop (its steps, prompts per step, ``align.samples_per_prompt`` responses
    each, sampling seeds, optimizer and update) with the verifiable reward ``algorithm.reward`` and
    ``algorithm.advantage`` in place of the discriminator's game. A gain of the game over this
    control is then not a gain of extra on-policy updates on the align prompts."""
    import torch

    cfg, game, alg = ctx.cfg, ctx.cfg.align, ctx.cfg.algorithm
    started = time.time()
    steps = ctx.stage.steps
    # the game's training prompts, its held-out ones left out alike
    skips, _, state, processor, client, reference = _policy_side(ctx)
    runtime, hf = state.runtime, state.runtime.hf_config
    if ctx.stage.eval_every > 0 and "eval_before" not in state.extra:
        state.extra["eval_before"] = evaluation_at_start(ctx, runtime, processor, client=client)
    bar = progress(steps, state.step, "align", every=cfg.run.log_every)
    last: dict[str, float] = dict(state.extra.get("final", {}))
    n = game.samples_per_prompt
    while state.step < steps:
        timer = Throughput()
        runtime.train()
        client.sync(runtime)
        timer.lap("sync")
        batch = state.loader.next_batch()
        by_id = {r.id: r for r in batch}
        requests, results, _, _ = sample_pairs(ctx, processor, client, hf, batch, n=n,
                                               seed=rollout_seed(cfg.run.seed, 4, state.step, ctx.dp_rank), skips=skips)
        timer.lap("rollout")
        scored = score(alg.reward, decode_responses(processor, results), [by_id[q.request_id] for q in requests])
        rewards = torch.tensor([float(x) for x in scored], dtype=torch.float64)
        accuracy = [float(getattr(x, "details", {}).get("accuracy", float(x))) for x in scored]
        lengths = torch.tensor([len(r.response_ids) for r in results], dtype=torch.float64)
        advantages = global_advantages(alg.advantage, rewards, [i // n for i in range(len(results))], lengths)
        timer.lap("score")
        samples = [{"request": q, "result": r, "advantage": float(a)}
                   for q, r, a in zip(requests, results, advantages.tolist())]
        metrics_sum, result = update_policy(cfg, runtime, samples, reference, timer, pause="align.update")
        state.step += 1
        tokens = max(metrics_sum.get("tokens", 0.0), 1.0)
        last = {"reward/mean": float(rewards.mean()), "reward/accuracy": sum(accuracy) / max(len(accuracy), 1),
                "advantage/mean": float(advantages.mean()), "advantage/std": float(advantages.std()),
                "response/length": float(lengths.mean()), **update_metrics(cfg, metrics_sum, result),
                "sync/seconds": client.last_sync.get("seconds", 0.0), **timer.scalars(int(tokens))}
        ctx.metrics.log("align", state.step, last)
        bar.step(last)
        if ctx.stage.eval_every > 0 and state.step % ctx.stage.eval_every == 0 and state.step < steps:
            ctx.metrics.log("align", state.step, run_evaluation(ctx, runtime, processor, label="during", client=client))
        state.extra["final"] = final_figures(last)
        state.extra["skips"] = skips.state_dict()
        checkpoint_or_stop(ctx, state, steps)  # healthy saves only; a stop request: save, exit 75
    bar.close()
    final = latest_checkpoint(ctx.checkpoint_root) or save(ctx, state)
    eval_after = run_evaluation(ctx, runtime, processor, label="after", client=client) if ctx.stage.eval_every > 0 else {}
    client.shutdown()
    return StageResult(stage="align", checkpoint=str(final), steps=state.step, wall_seconds=time.time() - started,
                       metrics={"final": last, "eval_before": state.extra.get("eval_before", {}), "eval_after": eval_after,
                                "policy_reward": "verifiable", "skipped_records": dict(skips.counts)})
