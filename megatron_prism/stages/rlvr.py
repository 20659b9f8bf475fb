"""RLVR: GRPO, DAPO or GSPO with verifiable rewards, as config choices of one trainer.

One step: prompts -> engine (``rollout.n`` samples each) -> rewards (registry) -> optional reward
shaping -> sampling filter with refill (DAPO dynamic sampling) -> advantages (registry) -> old
log-probs recomputed by the policy (and reference log-probs when a KL term is on) ->
``ppo_epochs`` x ``mini_batches`` updates with ``policy_loss(variant=algorithm.loss)`` -> weight
sync to the engine at the start of the next step.
"""

from __future__ import annotations

import logging
import time

import torch

from megatron_prism.algorithms import GroupRefillBuffer, shape_rewards
from megatron_prism.rollout import SamplingParams
from megatron_prism.stages.common import (
    banned_ids, decode_responses, evaluation_at_start, input_processor, make_client, prompt_requests, run_evaluation,
    score,
)
from megatron_prism.training.checkpoint import latest_checkpoint
from megatron_prism.training.faults import pause_point
from megatron_prism.training.loop import (StageContext, StageResult, Throughput, checkpoint_or_stop, final_figures,
                                          save, start_or_resume)
from megatron_prism.training.metrics import progress
from megatron_prism.stages.policy_update import (dp_sum, global_advantages, rollout_seed, update_metrics,
                                                 update_policy)
from megatron_prism.training.runtime import PolicyRuntime

log = logging.getLogger(__name__)


def _collect_rollouts(ctx, state, processor, client, skips, step: int):
    """Generate until the sampling filter has passed ``global_batch_size / dp`` groups on every
    data-parallel rank (all ranks take the same number of rounds, so loader positions agree)."""
    cfg, alg, ro = ctx.cfg, ctx.cfg.algorithm, ctx.cfg.rollout
    wanted = ctx.stage.global_batch_size // ctx.dp_size
    buffer = GroupRefillBuffer(alg.sampling_filter, groups_wanted=wanted, max_rounds=10**9)
    stop = [processor.im_end_id]
    banned = banned_ids(processor, state.runtime.hf_config)
    rounds = 0
    while True:
        rounds += 1
        requests, records = prompt_requests(processor, state.loader.next_batch(), skips)
        sampling = SamplingParams(n=ro.n, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                  max_new_tokens=ro.max_new_tokens, stop_ids=stop, banned_ids=banned,
                                  seed=rollout_seed(cfg.run.seed, step, rounds, ctx.dp_rank))
        results = client.generate(requests, sampling)
        pause_point("rlvr.rollout")
        responses = decode_responses(processor, results)
        expanded = [rec for rec in records for _ in range(ro.n)]
        scored = score(alg.reward, responses, expanded)
        rewards = torch.tensor([float(s) for s in scored], dtype=torch.float64)
        raw_scores = rewards.clone()
        accuracy = [float(getattr(s, "details", {}).get("accuracy", float(s))) for s in scored]
        lengths = torch.tensor([len(r.response_ids) for r in results])
        if alg.reward_shaping != "none":
            rewards = shape_rewards(alg.reward_shaping, rewards, lengths, max_response_length=ro.max_new_tokens,
                                    overlong_buffer=alg.overlong_buffer, penalty_factor=alg.overlong_penalty_factor)
        items = [
            {"request": requests[i // ro.n], "result": results[i], "reward": float(rewards[i]),
             "accuracy": accuracy[i], "engine_logprobs": results[i].logprobs}
            for i in range(len(results))
        ]
        group_ids = [f"{rounds}:{i // ro.n}" for i in range(len(results))]
        # what the filter judges groups on (verl's filter_groups.metric): accuracy by default
        values = {"acc": torch.tensor(accuracy, dtype=torch.float64), "score": raw_scores,
                  "seq_reward": rewards}[alg.filter_metric]
        buffer.add(items, values, group_ids)
        done = dp_sum([0.0 if buffer.full() else 1.0])[0] == 0
        if done:
            break
        if rounds >= alg.max_sampling_rounds:
            raise RuntimeError(
                f"rlvr step {step}: the '{alg.sampling_filter}' filter kept {len(buffer.kept_groups)} of {wanted} "
                f"groups after {rounds} generation rounds ({buffer.dropped_groups} groups dropped); raise "
                "algorithm.max_sampling_rounds or use data whose difficulty suits the policy")
    return buffer.take(), buffer.dropped_groups, rounds


def run_rlvr(ctx: StageContext) -> StageResult:
    from megatron_prism.data.loader import load_split

    cfg, alg = ctx.cfg, ctx.cfg.algorithm
    started = time.time()
    records, skips = load_split(ctx.split_path("rl"), "rl", strict=not cfg.data.lenient,
                                image_check_workers=cfg.data.image_check_workers)
    steps = ctx.stage.steps
    state = start_or_resume(ctx, records, total_steps=steps * alg.ppo_epochs * alg.mini_batches, seed_offset=1)
    skips.load_state_dict(state.extra.get("skips"))  # counted once, across a resume too
    runtime = state.runtime
    processor = input_processor(runtime.source, cfg.data)
    client = make_client(ctx, runtime)
    reference = (PolicyRuntime.build(ctx.source, cfg.model, cfg.parallel, None, total_steps=1, seed=cfg.run.seed,
                                     trainable=False) if alg.kl_coef > 0 else None)
    before = state.extra.get("eval_before")
    if before is None and ctx.stage.eval_every > 0:
        before = state.extra["eval_before"] = evaluation_at_start(ctx, runtime, processor, client=client)
    bar = progress(steps, state.step, "rlvr", every=cfg.run.log_every)
    last: dict[str, float] = dict(state.extra.get("final", {}))  # a stage resumed at its last step still reports them
    while state.step < steps:
        timer = Throughput()
        runtime.train()
        client.sync(runtime)
        timer.lap("sync")
        groups, dropped, rounds = _collect_rollouts(ctx, state, processor, client, skips, state.step)
        timer.lap("rollout")
        samples = [s for g in groups for s in g]
        rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float64)
        group_ids = [gi for gi, g in enumerate(groups) for _ in g]
        lengths = torch.tensor([len(s["result"].response_ids) for s in samples], dtype=torch.float64)
        advantages = global_advantages(alg.advantage, rewards, group_ids, lengths)
        for s, a in zip(samples, advantages.tolist()):
            s["advantage"] = a
        metrics_sum, result = update_policy(cfg, runtime, samples, reference, timer, pause="rlvr.update")
        state.step += 1
        tokens = max(metrics_sum.get("tokens", 0.0), 1.0)
        last = {
            "reward/mean": float(rewards.mean()), "reward/accuracy": sum(s["accuracy"] for s in samples) / len(samples),
            "response/length": sum(len(s["result"].response_ids) for s in samples) / len(samples),
            "filter/dropped_groups": float(dropped), "filter/rounds": float(rounds),
            **update_metrics(cfg, metrics_sum, result),
            "sync/seconds": client.last_sync.get("seconds", 0.0), **timer.scalars(int(tokens)),
        }
        ctx.metrics.log("rlvr", state.step, last)
        bar.step(last)
        if ctx.stage.eval_every > 0 and state.step % ctx.stage.eval_every == 0 and state.step < steps:
            ctx.metrics.log("rlvr", state.step, run_evaluation(ctx, runtime, processor, label="during", client=client))
        state.extra["final"] = final_figures(last)
        state.extra["skips"] = skips.state_dict()
        checkpoint_or_stop(ctx, state, steps)
    bar.close()
    final = latest_checkpoint(ctx.checkpoint_root) or save(ctx, state)
    after = run_evaluation(ctx, runtime, processor, label="after", client=client) if ctx.stage.eval_every > 0 else {}
    client.shutdown()
    return StageResult(stage="rlvr", checkpoint=str(final), steps=state.step,
                       wall_seconds=time.time() - started,
                       metrics={"final": last, "eval_before": before or {}, "eval_after": after,
                                "skipped_records": dict(skips.counts)})
