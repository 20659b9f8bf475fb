"""One policy-loss API for PPO/GRPO (verl's ``vanilla``), DAPO, GSPO and an unclipped surrogate.

``policy_loss(logp, old_logp, advantages, mask, variant=..., ...)`` returns ``(loss, metrics)``.
The variants differ in three choices, made by the registered variant function:

* the importance ratio: per token (``exp(logp - old_logp)``), or per sequence (GSPO's
  length-normalised ``exp(mean_t(logp - old_logp))`` with a per-token straight-through gradient);
* the clip range ``[1 - clip_low, 1 + clip_high]`` (symmetric for PPO/GRPO, "clip-higher" for
  DAPO, a tiny range for GSPO, none for ``unclipped``) and the dual clip;
* the default aggregation of the token losses (see ``aggregation.py``).

The token maths itself lives once, in ``kernels/fused_policy_loss.py``: a Triton kernel and, beside
it, its pure-torch reference. ``backend="triton"`` runs the kernel, ``"torch"`` the reference,
``"auto"`` the kernel on CUDA tensors and the reference otherwise (on a CPU the kernel runs only
under ``TRITON_INTERPRET=1``, as the tests do).

Sources: PPO clipped surrogate, Schulman et al. 2017, eq. 7; GRPO, Shao et al. 2024, eq. 3; dual
clip, Ye et al. 2020 ("Mastering Complex Control in MOBA Games", eq. 5); DAPO clip-higher and
token-level loss, Yu et al. 2025, eq. 8-10; GSPO, Zheng et al. 2025, eq. 5-7 (we use its
GSPO-token form, which has the same value and gradient when advantages are per sequence, as
verl does). Definitions match verl's ``compute_policy_loss_vanilla`` / ``_gspo``.

Names and defaults are verl's, so a verl config means the same here: ``vanilla`` (and its aliases
``ppo``, ``grpo``) is PPO's clip with the dual clip ``c = 3`` (verl's ``clip_ratio_c``, always on
in verl) for negative advantages; ``dapo`` the same with clip-higher; ``gspo`` has no dual clip, as
in verl. ``dual_clip=math.inf`` turns the dual clip off. The surrogate without any clip,
``-A * r``, is ``unclipped``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from megatron_prism.algorithms.aggregation import GlobalCounts, aggregate, row_scale
from megatron_prism.algorithms.kl import canonical_kl_kind
from megatron_prism.registry import Registry

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class SurrogateSettings:
    """Everything a variant needs besides the tensors; ``None`` means "the variant's default"."""

    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip: float | None = None
    agg: str | None = None
    ref_logp: torch.Tensor | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    backend: str = "auto"


@dataclass(frozen=True)
class PolicyLossInputs:
    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    counts: GlobalCounts | None
    norm_len: float | None


VariantFn = Callable[[PolicyLossInputs, SurrogateSettings], tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: Registry[VariantFn] = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register


def _token_loss_fn(backend: str, on_cuda: bool):
    from kernels import fused_policy_loss as fpl

    if backend == "auto":
        backend = "triton" if on_cuda else "torch"
    if backend == "torch":
        return fpl.policy_loss_reference
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "algorithm.loss_backend=triton needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "triton is imported to run the kernel in Triton's interpreter on a CPU; use 'auto' or 'torch'"
        )
    return fpl.fused_policy_loss


def clipped_surrogate(
    inputs: PolicyLossInputs, settings: SurrogateSettings, *, sequence_ratio: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The shared core of every variant: a (possibly sequence-level) clipped surrogate plus KL."""
    from kernels.fused_policy_loss import sequence_log_ratio

    if settings.clip_low is None or settings.clip_high is None or settings.agg is None:
        raise ValueError("the variant must fill clip_low, clip_high and agg before calling the core")
    scale = row_scale(inputs.mask, settings.agg, inputs.counts, inputs.norm_len)
    seq_lr = sequence_log_ratio(inputs.logp, inputs.old_logp, inputs.mask) if sequence_ratio else None
    use_kl = settings.ref_logp is not None and settings.kl_coef != 0.0
    token_loss = _token_loss_fn(settings.backend, inputs.logp.is_cuda)
    scale_dtype = torch.float64 if inputs.logp.dtype == torch.float64 else torch.float32
    return token_loss(
        inputs.logp, inputs.old_logp, inputs.advantages, inputs.mask,
        scale.to(device=inputs.logp.device, dtype=scale_dtype),
        clip_low=settings.clip_low, clip_high=settings.clip_high, dual_clip=settings.dual_clip,
        seq_log_ratio=seq_lr, ref_logp=settings.ref_logp if use_kl else None,
        kl_coef=settings.kl_coef if use_kl else 0.0, kl_kind=canonical_kl_kind(settings.kl_kind),
    )


#: verl's ``clip_ratio_c``: the dual clip's default for the token-level variants.
DUAL_CLIP_DEFAULT = 3.0


def _fill(settings: SurrogateSettings, clip_low: float, clip_high: float | None, agg: str,
          dual_clip: float | None = None) -> SurrogateSettings:
    low = settings.clip_low if settings.clip_low is not None else clip_low
    high = settings.clip_high if settings.clip_high is not None else (clip_high if clip_high is not None else low)
    dual = settings.dual_clip if settings.dual_clip is not None else dual_clip
    if dual is not None and math.isinf(dual) and dual > 0:
        dual = None  # +inf: no dual clip
    return replace(settings, clip_low=low, clip_high=high, agg=settings.agg or agg, dual_clip=dual)


@register_policy_loss("vanilla")
@register_policy_loss("grpo")
@register_policy_loss("ppo")
def clipped_token_surrogate(inputs: PolicyLossInputs, settings: SurrogateSettings):
    """verl's ``vanilla`` (PPO, and GRPO's loss): ``max(-A r, -A clip(r, 1-eps, 1+eps))`` per
    token, eps = 0.2 unless given, then ``min(., -A c)`` where ``A < 0`` with the dual clip
    ``c = 3`` unless given (``inf`` turns it off); token-mean aggregation."""
    return clipped_surrogate(inputs, _fill(settings, 0.2, None, "token-mean", dual_clip=DUAL_CLIP_DEFAULT),
                             sequence_ratio=False)


@register_policy_loss("dapo")
def dapo_surrogate(inputs: PolicyLossInputs, settings: SurrogateSettings):
    """DAPO clip-higher: ``eps_low = 0.2``, ``eps_high = 0.28`` (the paper's values), token-mean
    aggregation, and the dual clip ``c = 3`` (verl's ``clip_ratio_c``) bounding the loss of
    negative-advantage tokens whose ratio has blown up."""
    return clipped_surrogate(inputs, _fill(settings, 0.2, 0.28, "token-mean", dual_clip=DUAL_CLIP_DEFAULT),
                             sequence_ratio=False)


@register_policy_loss("gspo")
def gspo_surrogate(inputs: PolicyLossInputs, settings: SurrogateSettings):
    """GSPO: the sequence-level, length-normalised ratio ``s_i = exp(mean_t log(pi/pi_old))``,
    clipped to ``[1 - 3e-4, 1 + 4e-4]`` (the paper's range), averaged per sequence; no dual clip
    unless given (verl's GSPO has none)."""
    return clipped_surrogate(inputs, _fill(settings, 3e-4, 4e-4, "seq-mean-token-mean"), sequence_ratio=True)


@register_policy_loss("unclipped")
def unclipped_surrogate(inputs: PolicyLossInputs, settings: SurrogateSettings):
    """No clip at all: ``-A r`` per token (on-policy, its gradient is REINFORCE's ``-A grad log pi``)."""
    if settings.clip_low is not None or settings.clip_high is not None or settings.dual_clip is not None:
        raise ValueError("policy loss 'unclipped' has no clip range; leave clip_low/clip_high/dual_clip unset")
    unclipped = replace(settings, clip_low=math.inf, clip_high=math.inf, agg=settings.agg or "token-mean")
    return clipped_surrogate(inputs, unclipped, sequence_ratio=False)


def _metrics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local means next to the local sums (the trainer all-reduces the sums for global means)."""
    tokens = stats["tokens"].clamp(min=1.0)
    out = dict(stats)
    out["clip_frac"] = stats["clipped"] / tokens
    out["clip_frac_lower"] = stats["clipped_lower"] / tokens
    out["approx_kl"] = stats["neg_log_ratio"] / tokens
    out["ratio_mean"] = stats["ratio_sum"] / tokens
    out["kl_mean"] = stats["kl"] / tokens
    return out


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    variant: str = "grpo",
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str | None = None,
    *,
    counts: GlobalCounts | None = None,
    norm_len: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy-gradient loss of one piece of the global batch, and its metrics.

    ``logp, old_logp, mask`` are ``[B, T]``; ``advantages`` is ``[B, T]`` or ``[B]`` (broadcast
    over tokens). ``counts`` are the global batch's token/sequence counts: pass them whenever the
    batch is split into micro-batches or data-parallel ranks, so that the pieces' losses add up to
    the loss of the whole batch. ``None`` for a clip value or ``agg`` takes the variant's default.
    ``ref_logp``/``kl_coef``/``kl_kind`` add a KL loss term, ``entropy``/``entropy_coef`` an
    entropy bonus (``loss -= coef * agg(entropy)``), both aggregated like the surrogate.
    ``dual_clip=math.inf`` turns the variant's dual clip off.

    Metrics: local sums ``tokens, clipped, clipped_lower, neg_log_ratio, ratio_sum, ratio_max,
    ratio_min, kl`` and local means ``clip_frac, clip_frac_lower, approx_kl, ratio_mean, kl_mean``.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must share one [B, T] shape; got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        advantages = advantages[:, None].expand_as(logp)
    if advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if counts is None and not bool((mask != 0).any()):
        raise ValueError("mask selects no token: the loss of an empty batch is undefined (a piece of a "
                         "split batch may be empty only when the global counts are passed)")
    if counts is not None and counts.tokens <= 0:
        raise ValueError(f"counts.tokens is {counts.tokens}: the global batch has no loss token")
    if entropy is not None and entropy.shape != logp.shape:
        raise ValueError(f"entropy must have logp's shape {tuple(logp.shape)}, got {tuple(entropy.shape)}")
    inputs = PolicyLossInputs(logp, old_logp.detach(), advantages.detach(), mask, counts, norm_len)
    settings = SurrogateSettings(clip_low, clip_high, dual_clip, agg, ref_logp, kl_coef, kl_kind, backend)
    loss, stats = POLICY_LOSSES.get(variant)(inputs, settings)
    if entropy is not None and entropy_coef != 0.0:
        entropy_agg = agg or ("seq-mean-token-mean" if variant == "gspo" else "token-mean")
        loss = loss - entropy_coef * aggregate(entropy, mask, entropy_agg, counts, norm_len)
    return loss, _metrics(stats)
