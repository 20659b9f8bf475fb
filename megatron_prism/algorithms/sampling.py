"""Sampling filters: which rollout groups are worth training on.

A filter has the signature ``(values [B], group_ids [B]) -> keep [B] (bool)`` and keeps or drops
whole groups, judged on one per-response metric (``FILTER_METRICS``, config
``algorithm.filter_metric``): ``acc``, the answer's accuracy (DAPO eq. 11 and verl's default for
``filter_groups``), ``score``, the reward function's value, or ``seq_reward``, the reward after
shaping (the one the advantages see). ``GroupRefillBuffer`` implements DAPO's dynamic sampling
loop around a filter: keep generating batches and collecting the groups that pass until the
training batch is full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_prism.algorithms.advantages import group_index
from megatron_prism.registry import Registry

FilterFn = Callable[[torch.Tensor, Any], torch.Tensor]
#: The per-response metrics a filter can judge groups on (verl's names).
FILTER_METRICS = ("acc", "score", "seq_reward")
SAMPLING_FILTERS: Registry[FilterFn] = Registry("sampling filter")
register_sampling_filter = SAMPLING_FILTERS.register


@register_sampling_filter("none")
def keep_all(rewards: torch.Tensor, group_ids: Any) -> torch.Tensor:
    return torch.ones_like(rewards, dtype=torch.bool)


@register_sampling_filter("dapo_dynamic")
def drop_uniform_groups(rewards: torch.Tensor, group_ids: Any) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025, eq. 11): drop groups whose values are all equal; on
    accuracy, the paper's criterion, that is all right or all wrong. Their group-relative
    advantages are 0 (on any reward that follows accuracy), so they would only dilute the batch's
    gradient. Groups of one response are dropped too (nothing to compare)."""
    index, groups = group_index(group_ids)
    index = index.to(rewards.device)
    r = rewards.double()
    hi = torch.full((groups,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, index, r, "amax")
    lo = torch.full((groups,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, index, r, "amin")
    return (hi > lo)[index]


@dataclass
class GroupRefillBuffer:
    """Collects filtered groups across generation rounds until ``groups_wanted`` are in hand.

    ``add`` takes one generated batch (its records, the filter metric's values and group ids),
    keeps the groups the filter passes, and returns whether the buffer is full. ``take`` returns exactly
    ``groups_wanted`` groups (surplus groups of the last round are dropped, as DAPO does) and
    empties the buffer. After ``max_rounds`` rounds without filling, ``add`` raises: a task where
    nearly every group is uniform needs easier/harder data, not an endless loop.
    """

    filter_name: str
    groups_wanted: int
    max_rounds: int = 10
    rounds: int = 0
    kept_groups: list[list[Any]] = field(default_factory=list)
    dropped_groups: int = 0

    def add(self, records: Sequence[Any], values: torch.Tensor, group_ids: Any) -> bool:
        if len(records) != values.numel():
            raise ValueError(f"{len(records)} records but {values.numel()} filter values")
        self.rounds += 1
        keep = SAMPLING_FILTERS.get(self.filter_name)(values, group_ids).tolist()
        index, groups = group_index(group_ids)
        members: list[list[Any]] = [[] for _ in range(groups)]
        kept = [False] * groups
        for rec, g, k in zip(records, index.tolist(), keep):
            members[g].append(rec)
            kept[g] = k
        for g in range(groups):
            if kept[g]:
                self.kept_groups.append(members[g])
            else:
                self.dropped_groups += 1
        if not self.full() and self.rounds >= self.max_rounds:
            raise RuntimeError(
                f"dynamic sampling kept {len(self.kept_groups)} of {self.groups_wanted} groups after "
                f"{self.rounds} generation rounds ({self.dropped_groups} groups had uniform values); "
                "raise max_rounds or use data whose difficulty suits the policy"
            )
        return self.full()

    def full(self) -> bool:
        return len(self.kept_groups) >= self.groups_wanted

    def take(self) -> list[list[Any]]:
        if not self.full():
            raise RuntimeError(f"only {len(self.kept_groups)} of {self.groups_wanted} groups collected")
        out = self.kept_groups[: self.groups_wanted]
        self.kept_groups, self.rounds = [], 0
        return out
