"""Per-token estimators of KL(pi || pi_ref) from sampled tokens' log-probs.

Schulman, "Approximating KL Divergence" (2020): with ``r = pi_ref(x) / pi(x)`` for ``x ~ pi``,
``k1 = -log r`` is unbiased but high-variance, ``k2 = (log r)^2 / 2`` is biased but low-variance,
``k3 = (r - 1) - log r`` is unbiased and low-variance (and never negative). The clamps follow verl's
``kl_penalty`` so values carry over: ``log r`` to [-20, 20] before the exponential and ``k3`` to
[-10, 10]. ``k3+`` is verl's straight-through variant: the value of ``k3`` with the gradient of
``k1`` (d/dlogp = 1), an unbiased gradient of the KL when used as a loss term.

Usable as a loss term (``policy_loss(..., ref_logp=, kl_coef=)``) or as a reward penalty (call
``kl`` under ``torch.no_grad()`` and subtract ``beta * kl`` from the token rewards).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_prism.registry import Registry

KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


@KL_ESTIMATORS.register("abs")
def kl_abs(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return (logp - ref_logp).abs()


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    log_r = (ref_logp - logp).clamp(-20.0, 20.0)
    return (log_r.exp() - log_r - 1.0).clamp(-10.0, 10.0)


@KL_ESTIMATORS.register("k3+")
def kl_k3_straight_through(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    k1 = logp - ref_logp
    return k1 - k1.detach() + kl_k3(logp, ref_logp).detach()


# verl's spellings, so configs written for verl read the same here.
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "low_var_kl+": "k3+"}


def canonical_kl_kind(kind: str) -> str:
    kind = KL_ALIASES.get(kind, kind)
    KL_ESTIMATORS.get(kind)  # raises with the registered names if unknown
    return kind


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` of the policy from the reference (see module docstring)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    return KL_ESTIMATORS.get(canonical_kl_kind(kind))(logp, ref_logp)
