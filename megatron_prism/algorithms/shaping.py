"""Reward shapers: functions of a response's reward and length applied before advantages.

A shaper has the signature ``(rewards [B], response_lengths [B], **options) -> rewards [B]`` and is
registered by name (config ``algorithm.reward_shaping``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_prism.registry import Registry

ShaperFn = Callable[..., torch.Tensor]
REWARD_SHAPERS: Registry[ShaperFn] = Registry("reward shaper")
register_reward_shaper = REWARD_SHAPERS.register


@register_reward_shaper("none")
def no_shaping(rewards: torch.Tensor, response_lengths: torch.Tensor, **_: object) -> torch.Tensor:
    return rewards


@register_reward_shaper("dapo_overlong")
def overlong_penalty(
    rewards: torch.Tensor,
    response_lengths: torch.Tensor,
    *,
    max_response_length: int,
    overlong_buffer: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): no penalty up to
    ``L_max - L_buffer`` tokens, then a penalty growing linearly to ``-penalty_factor`` at
    ``L_max`` (and staying there beyond, for responses that were cut off).

    ``R_length(y) = min(0, (L_max - L_buffer - |y|) / L_buffer) * penalty_factor``, added to the
    reward, as verl's DAPO reward manager does.
    """
    if overlong_buffer <= 0 or overlong_buffer > max_response_length:
        raise ValueError(
            f"overlong_buffer must be in 1..max_response_length ({max_response_length}), got {overlong_buffer}"
        )
    if rewards.shape != response_lengths.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and lengths {tuple(response_lengths.shape)} differ")
    expected = max_response_length - overlong_buffer
    exceed = response_lengths.to(torch.float64) - expected
    penalty = (-exceed / overlong_buffer).clamp(min=-1.0, max=0.0) * penalty_factor
    return (rewards.to(torch.float64) + penalty).to(rewards.dtype)


def shape_rewards(name: str, rewards: torch.Tensor, response_lengths: torch.Tensor, **options: object) -> torch.Tensor:
    return REWARD_SHAPERS.get(name)(rewards, response_lengths, **options)
