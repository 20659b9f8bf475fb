"""Outcome advantage estimators: one scalar reward per response -> one advantage per response.

Every estimator has the signature ``(rewards [B], group_ids [B], **options) -> advantages [B]``,
where responses sharing a group id were sampled from the same prompt. The trainer broadcasts the
advantage over the response's tokens. Estimators are registered by name; the config picks one
(``algorithm.advantage``).

Definitions follow verl's ``core_algos`` so that results carry over, with one deliberate
difference: a group of size 1 has no baseline to compare against, so its advantage is 0 (verl
falls back to mean 0 / std 1 for GRPO, i.e. uses the raw reward).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_prism.registry import Registry

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage = ADVANTAGES.register


def group_index(group_ids: torch.Tensor | Sequence[Any]) -> tuple[torch.Tensor, int]:
    """Maps arbitrary group ids (ints, strings, uuids) to ``0..G-1``; returns (index [B], G)."""
    if isinstance(group_ids, torch.Tensor):
        _, index = torch.unique(group_ids, return_inverse=True)
        return index, int(index.max()) + 1 if index.numel() else 0
    table: dict[Any, int] = {}
    index = torch.tensor([table.setdefault(g, len(table)) for g in group_ids], dtype=torch.long)
    return index, len(table)


def _group_stats(rewards: torch.Tensor, group_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response: its group's size, mean reward and unbiased reward std (float64)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    index, groups = group_index(group_ids)
    if index.numel() != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards but {index.numel()} group ids")
    index = index.to(rewards.device)
    r = rewards.double()
    count = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, index, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, index, r)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, index, (r - mean[index]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()  # Bessel-corrected, as torch.std (verl) computes it
    return count[index], mean[index], std[index]


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor, group_ids, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, eq. 3 with outcome supervision):
    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``; ``norm_by_std=False`` gives Dr.GRPO."""
    count, mean, std = _group_stats(rewards, group_ids)
    adv = rewards.double() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


@register_advantage("drgrpo")
def drgrpo_advantages(rewards: torch.Tensor, group_ids, **_: Any) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean(r_group)``.

    Dropping the std division removes GRPO's question-difficulty bias; pair it with the
    ``seq-mean-token-sum-norm`` aggregation to also remove the length bias, as the paper does.
    """
    return grpo_advantages(rewards, group_ids, norm_by_std=False)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, group_ids, **_: Any) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): the baseline of response i is the mean reward of
    the *other* responses of its group, ``A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean)``."""
    count, mean, _ = _group_stats(rewards, group_ids)
    adv = (rewards.double() - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


BatchAllReduce = Callable[[torch.Tensor], torch.Tensor]


@register_advantage("reinforce_plus_plus_baseline")
def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    group_ids,
    *,
    response_lengths: torch.Tensor | None = None,
    all_reduce: BatchAllReduce | None = None,
    eps: float = 1e-8,
    **_: Any,
) -> torch.Tensor:
    """REINFORCE++ with baseline (Hu et al. 2025): subtract the group mean, then whiten over the
    whole global batch, which keeps the scale stable without a per-group std.

    As verl's ``compute_reinforce_plus_plus_baseline_outcome_advantage``: the whitening is over
    response *tokens* when ``response_lengths`` are given (each response's centred reward counts
    once per token, verl's ``masked_whiten``), ``(x - mean) * rsqrt(var + eps)`` with the unbiased
    variance. ``all_reduce`` sums a float64 tensor over the data-parallel ranks (each rank holds
    its share of the batch's groups): with it the mean and variance are the *global* batch's, so the
    result does not depend on the number of ranks. Without it this batch is the whole batch.

    Differences from verl: a group of one response gets 0 (verl keeps its raw reward), and counts
    as 0 in the batch statistics.
    """
    count, mean, _ = _group_stats(rewards, group_ids)
    centred = torch.where(count > 1, rewards.double() - mean, torch.zeros_like(mean))
    if response_lengths is None:
        weight = torch.ones_like(centred)
    else:
        weight = torch.as_tensor(response_lengths, device=centred.device).double()
        if weight.shape != centred.shape:
            raise ValueError(f"response_lengths must be [B] = [{centred.numel()}], got {tuple(weight.shape)}")
    reduce = all_reduce if all_reduce is not None else (lambda t: t)
    sums = reduce(torch.stack([weight.sum(), (weight * centred).sum()]))
    n, batch_mean = sums[0], sums[1] / sums[0].clamp(min=1e-30)
    sq = reduce((weight * (centred - batch_mean) ** 2).sum().reshape(1))[0]
    if float(n) <= 1:
        return torch.zeros_like(centred).to(rewards.dtype)
    var = sq / (n - 1)
    whitened = (centred - batch_mean) * torch.rsqrt(var + eps)
    return torch.where(count > 1, whitened, torch.zeros_like(whitened)).to(rewards.dtype)


def compute_advantages(name: str, rewards: torch.Tensor, group_ids, *, response_lengths: torch.Tensor | None = None,
                       all_reduce: BatchAllReduce | None = None, **options: Any) -> torch.Tensor:
    """Looks the estimator up by name (config ``algorithm.advantage``) and applies it.

    ``response_lengths`` and ``all_reduce`` (the data-parallel sum) describe the global batch; they
    reach only the estimators that take them (whitening over the batch), the others work per group
    and need nothing beyond their groups."""
    fn = ADVANTAGES.get(name)
    accepted = inspect.signature(fn).parameters
    for key, value in (("response_lengths", response_lengths), ("all_reduce", all_reduce)):
        if value is not None and key in accepted:
            options[key] = value
    return fn(rewards, group_ids, **options)
