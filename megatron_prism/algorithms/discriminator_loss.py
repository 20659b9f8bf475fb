"""Discriminator losses of the WARMUP and ALIGN stages: teacher demonstrations should score above
policy responses, part by part (caption; think + answer).

A loss takes ``teacher [B, P]`` and ``policy [B, P]`` scores, where row ``i`` pairs policy response
``i`` with the teacher demonstration of the same prompt (a prompt with ``n`` sampled responses
contributes ``n`` rows, its demonstration scored in each), and column ``p`` is a part (in ALIGN:
0 caption, 1 reasoning). ``valid [B]`` or ``[B, P]`` marks the pairs that count: a policy response
that breaks the format has no parts to compare. It returns ``(loss, metrics)``.

The Bradley-Terry form is PRISM's (``verl/verl/workers/critic/dp_critic.py``, ``update_critic`` in
``mm_gad`` mode, and ``moe/train_moe_vl_warmup_fast.py``), written anew with these differences:

* the mean over valid pairs may divide by a *global* count (``num_valid``: the valid pairs of the
  whole data-parallel batch), so the gradient does not depend on how a batch is split over ranks;
  PRISM divides by the rank's local count;
* the score L2 covers teacher scores and *valid* policy scores; PRISM also includes the scores of
  invalid responses, which it computes on an arbitrary half/half split of the text;
* with no valid pair the accuracy metrics are NaN; PRISM logs a hard-coded 0.92.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from megatron_prism.registry import Registry

DiscriminatorLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
DISCRIMINATOR_LOSSES: Registry[DiscriminatorLossFn] = Registry("discriminator loss")
register_discriminator_loss = DISCRIMINATOR_LOSSES.register

#: Part names of the ALIGN game, in column order of the score tensors.
PARTS: tuple[str, ...] = ("caption", "reasoning")


def _check(teacher: torch.Tensor, policy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Validates shapes; returns the valid mask as a float ``[B, P]``."""
    if teacher.dim() != 2 or teacher.shape != policy.shape:
        raise ValueError(f"teacher and policy scores must both be [B, P]; got {tuple(teacher.shape)} and "
                         f"{tuple(policy.shape)}")
    if valid.dim() == 1 and valid.shape[0] == teacher.shape[0]:
        valid = valid.unsqueeze(1).expand_as(teacher)
    if valid.shape != teacher.shape:
        raise ValueError(f"valid must be [B] or [B, P] = {tuple(teacher.shape)}; got {tuple(valid.shape)}")
    return valid.to(teacher.dtype)


@register_discriminator_loss("bradley_terry")
def bradley_terry_loss(
    teacher: torch.Tensor,
    policy: torch.Tensor,
    valid: torch.Tensor,
    *,
    score_l2: float = 0.0,
    score_clip: float | None = None,
    part_reduction: str = "sum",
    num_valid: torch.Tensor | Sequence[float] | None = None,
    fallback_coef: float = 0.01,
    part_names: Sequence[str] = PARTS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-part Bradley-Terry loss (Bradley & Terry 1952; the pairwise reward-model loss of
    Ouyang et al. 2022, eq. 1): for part p,

        L_p = sum_{i valid} -log sigmoid(t_ip - s_ip) / N_p

    with ``N_p`` the number of valid pairs of part p (``num_valid[p]`` when given, else counted
    here), and ``L = sum_p L_p`` (``part_reduction="sum"``, PRISM's ALIGN: ``cap_loss + cot_loss``)
    or ``mean_p L_p`` (``"mean"``, PRISM's warm-up, whose batches mix caption and cot pairs).

    ``score_clip`` clamps every score to ``[-c, c]`` first (PRISM's ALIGN, ``critic.score_clip``;
    the clamp also stops the gradient of a score beyond it). ``score_l2`` adds
    ``score_l2 * mean(x^2)`` over the teacher scores and the valid policy scores, which keeps the
    scores' magnitude bounded (PRISM ``critic.score_reg_coef``; PRISM averages the four part/side
    means, equal to this mean when every pair is valid).

    When no pair of part p is valid anywhere (``N_p = 0``) the part's loss is PRISM's fallback
    ``fallback_coef * -log sigmoid(mean_i t_ip)``, which still pushes teacher scores up, instead
    of a 0/0.

    Metrics (floats): ``disc/loss``, ``disc/score_l2``, ``disc/valid_ratio`` and per part
    ``disc/<part>/loss``, ``/acc`` (fraction of valid pairs with ``t > s``; NaN with none),
    ``/gap`` (mean ``t - s`` over valid pairs), ``/teacher_mean``, ``/policy_mean``.
    """
    mask = _check(teacher, policy, valid)
    if part_reduction not in ("sum", "mean"):
        raise ValueError(f"part_reduction must be 'sum' or 'mean', got {part_reduction!r}")
    parts = teacher.shape[1]
    if len(part_names) != parts:
        raise ValueError(f"{parts} score columns but {len(part_names)} part names {list(part_names)}")
    if score_clip is not None:
        teacher = teacher.clamp(-score_clip, score_clip)
        policy = policy.clamp(-score_clip, score_clip)
    local = mask.sum(0)
    if num_valid is None:
        count = local
    else:
        count = torch.as_tensor(num_valid, dtype=teacher.dtype, device=teacher.device).reshape(parts)
    diff = teacher - policy
    pair = -F.logsigmoid(diff) * mask  # masked rows contribute exactly 0 (and no gradient)
    part_loss = []
    for p in range(parts):
        if float(count[p]) > 0:
            part_loss.append(pair[:, p].sum() / count[p])
        else:
            part_loss.append(fallback_coef * -F.logsigmoid(teacher[:, p].mean()))
    stacked = torch.stack(part_loss)
    loss = stacked.sum() if part_reduction == "sum" else stacked.mean()
    squares = torch.cat([teacher.reshape(-1) ** 2, (policy ** 2 * mask).reshape(-1)])
    l2 = squares.sum() / (teacher.numel() + mask.sum())
    if score_l2:
        loss = loss + score_l2 * l2

    with torch.no_grad():
        metrics: dict[str, float] = {"disc/loss": float(loss.detach()), "disc/score_l2": float(l2.detach()),
                                     "disc/valid_ratio": float(mask.mean()) if mask.numel() else float("nan")}
        for p, name in enumerate(part_names):
            n = float(local[p])
            m = mask[:, p]
            metrics[f"disc/{name}/loss"] = float(stacked[p])
            metrics[f"disc/{name}/acc"] = float(((diff[:, p] > 0).to(m.dtype) * m).sum() / n) if n else float("nan")
            metrics[f"disc/{name}/gap"] = float((diff[:, p] * m).sum() / n) if n else float("nan")
            metrics[f"disc/{name}/policy_mean"] = float((policy[:, p] * m).sum() / n) if n else float("nan")
            metrics[f"disc/{name}/teacher_mean"] = float(teacher[:, p].mean()) if teacher.shape[0] else float("nan")
    return loss, metrics


def discriminator_loss(name: str, teacher: torch.Tensor, policy: torch.Tensor, valid: torch.Tensor,
                       **options: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """Looks the loss up by name and applies it."""
    return DISCRIMINATOR_LOSSES.get(name)(teacher, policy, valid, **options)
