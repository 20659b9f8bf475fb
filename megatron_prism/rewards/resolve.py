"""The public way in: a reward by registered name or by combined-reward spec.

Layering (no import circle): ``base`` (result type, registry, stats) <- ``pool`` (worker processes)
<- ``combined`` (weighted combinations) <- this module, which is the only one that knows about
specs. Config values reach rewards through here (``algorithm.reward`` may be either form).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from megatron_prism.rewards import pool
from megatron_prism.rewards.base import RewardFn, RewardResult, lookup_reward
from megatron_prism.rewards.combined import combined_reward


def get_reward(name_or_spec: str | Mapping[str, Any]) -> RewardFn:
    """The reward registered as ``name``, or a combined reward built from a spec mapping.

    An unknown name raises ``UnknownNameError`` naming the nearest registered one.
    """
    if isinstance(name_or_spec, Mapping):
        return combined_reward(name_or_spec)
    return lookup_reward(name_or_spec)


def score_batch(name_or_fn: str | Mapping[str, Any] | Callable[..., Any], responses: Sequence[str],
                answers: Sequence[str], *, timeout_s: float = 5.0, workers: int = 2,
                item_kwargs: Sequence[Mapping[str, Any]] | None = None, **kw: Any) -> list[RewardResult]:
    """``pool.score_batch`` for a registered name, a combined-reward spec, or a picklable callable."""
    fn = get_reward(name_or_fn) if isinstance(name_or_fn, (str, Mapping)) else name_or_fn
    return pool.score_batch(fn, responses, answers, timeout_s=timeout_s, workers=workers,
                            item_kwargs=item_kwargs, **kw)
