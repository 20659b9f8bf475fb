"""The policy-gradient update that RLVR and ALIGN share: samples with advantages -> micro-batches
-> old (and reference) log-probs -> ``ppo_epochs`` x ``mini_batches`` optimizer steps with
``policy_loss(variant=algorithm.loss)``. The stages differ only in where the advantages come from
(verifiable rewards vs discriminator part scores).

As verl: a strictly on-policy step (one epoch, one mini-batch) takes the old log-probs to be the
current ones, detached, instead of a second forward (the ratio is 1, its gradient the policy
gradient); the entropy is computed only when its coefficient or its metric
(``algorithm.log_entropy``) needs it; the logged loss is the mean over the optimizer steps that ran.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_prism.algorithms import compute_advantages, policy_loss
from megatron_prism.algorithms.aggregation import GlobalCounts
from megatron_prism.config.schema import PrismConfig
from megatron_prism.data.processing import IGNORE_INDEX
from megatron_prism.parallel.devices import host_group
from megatron_prism.training.faults import pause_point
from megatron_prism.training.loop import Throughput
from megatron_prism.training.optimizer import StepResult
from megatron_prism.training.runtime import MicroBatch, PolicyRuntime, step_figures


def dp_sum(values: list[float]) -> list[float]:
    """Host figures summed over the data-parallel ranks, on the host (gloo) twin of the DP group:
    RLVR's "every rank has its groups?" vote waits there while other replicas still generate."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=host_group("data_parallel"))
    return t.tolist()


def global_advantages(advantage: str, rewards: torch.Tensor, group_ids: list[int],
                      response_lengths: torch.Tensor) -> torch.Tensor:
    """``compute_advantages`` for one step's verifiable rewards on this rank; estimators that whiten
    over the batch see the global one (their statistics summed over the data-parallel ranks)."""
    return compute_advantages(advantage, rewards, group_ids, response_lengths=response_lengths,
                              all_reduce=lambda t: torch.tensor(dp_sum(t.tolist()), dtype=t.dtype))


def rollout_seed(*parts: int) -> int:
    """A sampling seed from (run seed, step, round, dp rank, ...): the same on a resumed run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def micro_batches(samples: list[dict], size: int, multiple: int) -> list[MicroBatch]:
    """Right-padded micro-batches of prompt + response with next-token targets on the response."""
    out = []
    for start in range(0, len(samples), size):
        chunk = samples[start:start + size]
        seqs = [s["request"].prompt_ids + s["result"].response_ids for s in chunk]
        length = -(-max(map(len, seqs)) // multiple) * multiple
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        targets = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
        adv = torch.zeros(len(chunk), length)
        pixels, grids = [], []
        for row, (s, seq) in enumerate(zip(chunk, seqs)):
            p = len(s["request"].prompt_ids)
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            response = s["result"].response_ids
            targets[row, p - 1:p - 1 + len(response)] = torch.tensor(response)
            adv[row] = s["advantage"]
            if s["request"].pixel_values is not None:
                pixels.append(s["request"].pixel_values)
                grids.append(s["request"].image_grid_thw)
        tensors = {"input_ids": ids, "attention_mask": mask, "targets": targets, "advantages": adv,
                   "pixel_values": torch.cat(pixels) if pixels else None,
                   "image_grid_thw": torch.cat(grids) if grids else None}
        out.append(MicroBatch(tensors, num_tokens=int((targets != IGNORE_INDEX).sum())))
    return out


def recompute(runtime: PolicyRuntime, mbs: list[MicroBatch], key: str) -> None:
    """Fills ``tensors[key]`` with the runtime's log-probs of the targets (last stage only)."""
    def keep(index, out):
        mbs[index].tensors[key] = out.logp.detach().float()

    with torch.no_grad():
        runtime.run(mbs, lambda out, t: (out.logp.sum() * 0, {}), forward_only=True, collect=keep)


def update_policy(cfg: PrismConfig, runtime: PolicyRuntime, samples: list[dict], reference: PolicyRuntime | None,
                  timer: Throughput, *, pause: str) -> tuple[dict[str, float], StepResult]:
    """The update of one step. ``samples``: dicts with ``request``, ``result`` and ``advantage``.
    ``pause`` names the fault-injection point hit after each mini-batch's backward."""
    alg, ro = cfg.algorithm, cfg.rollout
    multiple = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
    mbs = micro_batches(samples, cfg.parallel.micro_batch_size, multiple)
    per_mini = -(-len(mbs) // alg.mini_batches)
    # one epoch of one optimizer step: the policy that sampled is the one being updated
    on_policy = alg.ppo_epochs == 1 and per_mini >= len(mbs)
    if not on_policy:
        recompute(runtime, mbs, "old_logp")
    if reference is not None:
        recompute(reference, mbs, "ref_logp")
    timer.lap("logprobs")
    metrics_sum: dict[str, float] = {}
    with_entropy = alg.entropy_coef != 0.0 or alg.log_entropy
    result = None
    updates = 0
    for _ in range(alg.ppo_epochs):
        for start in range(0, len(mbs), per_mini):
            mini = mbs[start:start + per_mini]
            tok, seqs = dp_sum([sum(m.num_tokens for m in mini),
                                sum(int(((m.tensors["targets"] != IGNORE_INDEX).sum(-1) > 0).sum()) for m in mini)])
            counts = GlobalCounts(tokens=tok, seqs=seqs)

            def loss_fn(out, t, counts=counts):
                mask = t["targets"] != IGNORE_INDEX
                old_logp = out.logp.detach() if on_policy else t["old_logp"]
                loss, m = policy_loss(
                    out.logp, old_logp, t["advantages"], mask, alg.loss, alg.clip_low, alg.clip_high,
                    alg.dual_clip, alg.loss_agg, counts=counts, norm_len=ro.max_new_tokens,
                    ref_logp=t.get("ref_logp"), kl_coef=alg.kl_coef, kl_kind=alg.kl_kind,
                    entropy=out.entropy, entropy_coef=alg.entropy_coef, backend=alg.loss_backend)
                figures = {"loss": float(loss.detach()), "tokens": float(m["tokens"]), "clipped": float(m["clipped"]),
                           "clipped_lower": float(m["clipped_lower"]), "approx_kl": float(m["neg_log_ratio"]),
                           "kl": float(m["kl"])}
                if out.entropy is not None:
                    figures["entropy"] = float((out.entropy.detach() * mask).sum())
                return loss, figures

            runtime.optimizer.zero_grad()
            for red in runtime.run(mini, loss_fn, with_entropy=with_entropy):
                for k, v in red.items():
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + v
            pause_point(pause)
            result = runtime.optimizer.step()
            updates += 1
    timer.lap("train")
    metrics_sum = step_figures(metrics_sum)  # from the last PP stage, summed over DP ranks
    # the loss figure is a sum over the optimizer steps that ran; fewer micro-batches than
    # mini-batches (a small step) runs fewer of them than ppo_epochs * mini_batches
    metrics_sum["updates"] = float(updates)
    return metrics_sum, result


def update_metrics(cfg: PrismConfig, metrics_sum: dict[str, float], result: StepResult) -> dict[str, Any]:
    """The logged figures of one update (per-token means over the step's loss tokens)."""
    alg = cfg.algorithm
    tokens = max(metrics_sum.get("tokens", 0.0), 1.0)
    updates = max(metrics_sum.get("updates", alg.ppo_epochs * alg.mini_batches), 1.0)
    entropy = metrics_sum["entropy"] / tokens if "entropy" in metrics_sum else float("nan")
    return {
        "loss": metrics_sum.get("loss", float("nan")) / updates, "clip_frac": metrics_sum.get("clipped", 0.0) / tokens,
        "clip_frac_lower": metrics_sum.get("clipped_lower", 0.0) / tokens,
        "approx_kl": metrics_sum.get("approx_kl", 0.0) / tokens, "kl": metrics_sum.get("kl", 0.0) / tokens,
        "entropy": entropy, "grad_norm": result.grad_norm, "lr": result.lr,
    }
