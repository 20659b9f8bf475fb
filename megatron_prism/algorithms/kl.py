"""Per-token estimators of KL(pi || pi_ref) from sampled tokens' log-probs.

Schulman, "Approximating KL Divergence" (2020): with ``r = pi_ref(x) / pi(x)`` for ``x ~ pi``,
``k1 = -log r`` is unbiased but high-variance, ``k2 = (log r)^2 / 2`` is biased but low-variance,
``k3 = (r - 1) - log r`` is unbiased and low-variance (and never negative). The clamps follow verl's
``kl_penalty`` so values carry over: ``log r`` to [-20, 20] before the exponential and ``k3`` to
[-10, 10].

``k1+``, ``abs+`` and ``k3+`` are verl's straight-through variants: the value of the named
estimator with the gradient of ``k2``, ``d/dlogp = logp - ref``. Why: over tokens sampled from pi,
the expected gradient of k1 is zero (E_pi[grad log pi] = 0) and k3's is not the KL's gradient
either, whereas E_pi[(log pi - log ref) grad log pi] is exactly grad KL(pi || ref). As a loss term,
``k3+`` therefore pulls the policy back to the reference with the right gradient while logging the
low-variance k3 value.

Usable as a loss term (``policy_loss(..., ref_logp=, kl_coef=)``) or as a reward penalty (call
``kl`` under ``torch.no_grad()`` and subtract ``beta * kl`` from the token rewards).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from kernels.fused_policy_loss import KL_KINDS, kl_reference
from megatron_prism.registry import Registry

KLFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")

# The formulas live once, beside the fused kernel that computes them per token
# (kernels/fused_policy_loss.py); the registry names them for configs and for reward penalties.
for _kind in KL_KINDS:
    KL_ESTIMATORS.register(_kind)(functools.partial(kl_reference, kind=_kind))


# verl's spellings, so configs written for verl read the same here.
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "kl+": "k1+", "low_var_kl+": "k3+"}


def canonical_kl_kind(kind: str) -> str:
    kind = KL_ALIASES.get(kind, kind)
    KL_ESTIMATORS.get(kind)  # raises with the registered names if unknown
    return kind


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` of the policy from the reference (see module docstring)."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    return KL_ESTIMATORS.get(canonical_kl_kind(kind))(logp, ref_logp)
