"""The KL estimators written out for the tests' float64 oracles (never imported from the package).

Schulman (2020) "Approximating KL divergence" with verl's clamps (``kl_penalty``): k1 = logp - ref,
abs = |logp - ref|, k2 = (logp - ref)^2 / 2, k3 = exp(log r) - log r - 1 with log r = ref - logp
clamped to +-20 and the value to +-10; a trailing ``+`` keeps the value and takes k2's gradient.
"""

from __future__ import annotations

import torch


def kl_estimate(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    x = logp - ref
    base = kind.rstrip("+")
    if base == "k1":
        value = x
    elif base == "abs":
        value = x.abs()
    elif base == "k2":
        value = x * x / 2
    else:
        log_r = (ref - logp).clamp(-20.0, 20.0)
        value = (log_r.exp() - log_r - 1).clamp(-10.0, 10.0)
    if kind.endswith("+"):
        half_sq = x * x / 2
        value = half_sq - half_sq.detach() + value.detach()
    return value
