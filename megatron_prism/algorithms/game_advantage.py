"""The ALIGN game's advantage: group-normalised discriminator part scores, minus a format penalty.

Registered as the advantage estimator ``prism_game``. With the registry's signature
``(rewards, group_ids, **options)``, ``rewards`` is the ``[B, P]`` matrix of discriminator part
scores of the policy responses (columns in ``weights`` order; in ALIGN 0 caption, 1 reasoning),
scored *before* the discriminator's update of the step, and ``invalid [B]`` marks responses that
break the format (their scores are ignored).

PRISM's estimator (``grpo_multi_reward``, default mode, in ``verl/verl/trainer/ppo/core_algos.py``,
with the scores of ``verl/verl/workers/critic/dp_critic.py``), written anew:

1. clip every score to ``[-score_clip, score_clip]``;
2. per group and part, an invalid response's score becomes ``min(valid scores of its group) -
   invalid_offset``, below every valid response, so it does not pull the group mean up; with no
   valid response in the group it becomes ``-invalid_offset`` (PRISM: ``0 - 1``);
3. per part, ``GN(x)_i = (x_i - mean_g) / (std_g + eps)`` within the group (Bessel std, as GRPO);
4. ``A_i = sum_p w_p GN(x_p)_i - invalid_penalty * invalid_i``.

Where this differs from PRISM, and why:

* a group whose (adjusted) scores are all equal gets ``GN = 0`` exactly (PRISM divides a rounding
  residue by ``eps``, which can leave values of order 1e-10 instead of 0);
* a group of one response gets ``GN = 0`` (no baseline to compare with), as every estimator of
  :mod:`.advantages`; PRISM (verl) uses mean 0 / std 1 there, i.e. the raw clipped score. PRISM's
  groups have 16 responses, so this never arises in its recipe;
* PRISM's docstring writes ``A = A_align * (1 - F) - penalty * F``, but its code (and this) keeps
  the group-normalised term of an invalid response, which is negative by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_prism.algorithms.advantages import _group_stats, group_index, register_advantage


def _group_extreme(values: torch.Tensor, index: torch.Tensor, groups: int, reduce: str,
                   include: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: ``reduce`` ('amin'/'amax') of ``values`` over rows with ``include``; and whether
    the group had any such row. float64 ``[G]`` and bool ``[G]``."""
    fill = float("inf") if reduce == "amin" else float("-inf")
    out = torch.full((groups,), fill, dtype=torch.float64, device=values.device)
    picked = torch.where(include, values, torch.full_like(values, fill))
    out = out.scatter_reduce(0, index, picked, reduce=reduce, include_self=True)
    present = torch.zeros(groups, dtype=torch.bool, device=values.device).index_fill_(0, index[include], True)
    return out, present


def group_normalize(x: torch.Tensor, group_ids, eps: float = 1e-6) -> torch.Tensor:
    """``(x - mean_g) / (std_g + eps)`` within each group (float64), 0 for a group of one response
    or a group whose values are all equal."""
    index, groups = group_index(group_ids)
    index = index.to(x.device)
    count, mean, std = _group_stats(x, group_ids)
    hi, _ = _group_extreme(x.double(), index, groups, "amax", torch.ones_like(x, dtype=torch.bool))
    lo, _ = _group_extreme(x.double(), index, groups, "amin", torch.ones_like(x, dtype=torch.bool))
    constant = (hi == lo)[index]
    out = (x.double() - mean) / (std + eps)
    return torch.where((count > 1) & ~constant, out, torch.zeros_like(out))


@register_advantage("prism_game")
def prism_game_advantages(
    rewards: torch.Tensor,
    group_ids,
    *,
    invalid: torch.Tensor,
    weights: Sequence[float] = (0.5, 0.5),
    invalid_penalty: float = 1.5,
    invalid_offset: float = 1.0,
    score_clip: float | None = 10.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The game advantage (see the module doc); ``rewards [B, P]`` part scores, ``invalid [B]``
    bool, ``weights`` one per part (config ``align.caption_weight``, ``align.reasoning_weight``).
    Returns ``[B]`` in ``rewards``' dtype."""
    if rewards.dim() != 2:
        raise ValueError(f"prism_game needs part scores [B, P] (caption, reasoning); got shape {tuple(rewards.shape)}")
    batch, parts = rewards.shape
    if len(weights) != parts:
        raise ValueError(f"{parts} part-score columns but {len(weights)} weights {list(weights)}")
    invalid = torch.as_tensor(invalid, device=rewards.device).bool()
    if invalid.shape != (batch,):
        raise ValueError(f"invalid must be [B] = [{batch}]; got shape {tuple(invalid.shape)}")
    index, groups = group_index(group_ids)
    if index.numel() != batch:
        raise ValueError(f"{batch} responses but {index.numel()} group ids")
    index = index.to(rewards.device)
    scores = rewards.double()
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    total = torch.zeros(batch, dtype=torch.float64, device=rewards.device)
    for p in range(parts):
        lowest, has_valid = _group_extreme(scores[:, p], index, groups, "amin", ~invalid)
        floor = torch.where(has_valid, lowest, torch.zeros_like(lowest)) - invalid_offset
        adjusted = torch.where(invalid, floor[index], scores[:, p])
        total = total + weights[p] * group_normalize(adjusted, group_ids, eps)
    total = total - invalid_penalty * invalid.double()
    return total.to(rewards.dtype)
