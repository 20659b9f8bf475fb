"""policy_loss: each variant against the papers' formulas written as plain loops, the variants'
defaults, split invariance over micro-batches / ranks, and the Triton backend through the API."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_prism.algorithms import AGG_MODES, GlobalCounts, aggregate, local_counts, policy_loss
from megatron_prism.registry import UnknownNameError

BACKENDS = ["torch", "triton"]


def _batch(seed, b=8, t=11, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    logp = old + torch.randn(b, t, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[2] = 0  # an all-masked response
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def _loop_token_surrogate(logp, old, adv, mask, lo, hi, dual=None):
    """PPO/GRPO/DAPO per token, token-mean: (1/N) sum max(-A r, -A clip(r)) [min with -A c if A<0]."""
    total, n = 0.0, 0
    for b in range(logp.shape[0]):
        a = float(adv[b])
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = math.exp(float(logp[b, t] - old[b, t]))
            loss = max(-a * r, -a * _clip(r, 1 - lo, 1 + hi))
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            total += loss
            n += 1
    return total / n


def _loop_gspo(logp, old, adv, mask, lo, hi):
    """GSPO (Zheng et al. 2025, eq. 5): (1/G) sum_i max(-A s_i, -A clip(s_i)),
    s_i = exp(mean_t log(pi/pi_old)), over responses with at least one token."""
    total, g = 0.0, 0
    for b in range(logp.shape[0]):
        idx = [t for t in range(logp.shape[1]) if mask[b, t]]
        if not idx:
            continue
        s = math.exp(sum(float(logp[b, t] - old[b, t]) for t in idx) / len(idx))
        a = float(adv[b])
        total += max(-a * s, -a * _clip(s, 1 - lo, 1 + hi))
        g += 1
    return total / g


@pytest.mark.parametrize("backend", BACKENDS)
def test_variants_match_paper_formulas(backend):
    logp, old, adv, mask = _batch(0)
    cases = [
        ("grpo", {}, _loop_token_surrogate(logp, old, adv, mask, 0.2, 0.2)),
        ("ppo", {"clip_low": 0.1}, _loop_token_surrogate(logp, old, adv, mask, 0.1, 0.1)),
        ("dapo", {}, _loop_token_surrogate(logp, old, adv, mask, 0.2, 0.28, dual=3.0)),
        ("vanilla", {}, _loop_token_surrogate(logp, old, adv, mask, math.inf, math.inf)),
    ]
    tol = 1e-12 if backend == "torch" else 2e-6  # the kernel computes in fp32
    for variant, kw, expected in cases:
        loss, metrics = policy_loss(logp, old, adv, mask, variant, backend=backend, **kw)
        assert float(loss) == pytest.approx(expected, rel=tol, abs=tol), variant
        assert 0.0 < float(metrics["clip_frac"]) < 1.0 or variant == "vanilla"
    g_logp, g_old, g_adv, g_mask = _batch(1, spread=3e-4)  # ratios near GSPO's tiny clip range
    loss, _ = policy_loss(g_logp, g_old, g_adv, g_mask, "gspo", backend=backend)
    assert float(loss) == pytest.approx(_loop_gspo(g_logp, g_old, g_adv, g_mask, 3e-4, 4e-4), rel=tol, abs=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_clip_bounds_negative_advantage_losses(backend):
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[3.0, 0.0, 3.0]], dtype=torch.float64, requires_grad=True)  # ratios e^3, 1, e^3
    adv = torch.tensor([[-1.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = policy_loss(logp, old, adv, mask, "dapo", agg="seq-mean-token-sum", backend=backend)
    # token 0: A<0, ratio e^3 > c=3 -> loss -A*c = 3, no gradient; token 1: ratio 1 -> 1;
    # token 2: A>0, ratio above 1.28 -> clipped to -1.28, no gradient.
    assert float(loss.detach()) == pytest.approx(3.0 + 1.0 - 1.28, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert float(m["clipped_lower"]) == 1.0 and float(m["clipped"]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["grpo", "dapo", "gspo", "vanilla"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_loss_and_gradient_do_not_depend_on_the_split(backend, variant, agg):
    """One global batch of 8 as 1 piece of 8 and as 4 pieces of 2 (micro-batches or DP ranks):
    with the global counts passed in, the summed losses and the gradients are the same."""
    logp, old, adv, mask = _batch(2)
    ref = torch.randn(logp.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 0.1 + logp
    kw = dict(variant=variant, agg=agg, backend=backend, norm_len=16, kl_coef=0.05)
    counts = local_counts(mask)
    whole = logp.clone().requires_grad_(True)
    loss_whole, _ = policy_loss(whole, old, adv, mask, counts=counts, ref_logp=ref, **kw)
    (grad_whole,) = torch.autograd.grad(loss_whole, whole)

    split = logp.clone().requires_grad_(True)
    total = 0.0
    for rows in torch.arange(8).split(2):
        piece, _ = policy_loss(split[rows], old[rows], adv[rows], mask[rows], counts=counts, ref_logp=ref[rows], **kw)
        total = total + piece
    (grad_split,) = torch.autograd.grad(total, split)
    tol = 1e-12 if backend == "torch" else 1e-6
    torch.testing.assert_close(total, loss_whole, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_split, grad_whole, rtol=tol, atol=tol)
    assert grad_whole.abs().sum() > 0


def test_without_global_counts_the_split_changes_the_loss():
    """The reason counts exist: normalising each piece by itself is a different function."""
    logp, old, adv, mask = _batch(3)
    whole, _ = policy_loss(logp, old, adv, mask, "grpo", agg="token-mean", backend="torch")
    pieces = sum(policy_loss(logp[r], old[r], adv[r], mask[r], "grpo", agg="token-mean", backend="torch")[0]
                 for r in torch.arange(8).split(2))
    assert abs(float(pieces) / 4 - float(whole)) > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_and_entropy_terms(backend):
    logp, old, adv, mask = _batch(4)
    ref = logp.detach() - 0.3
    base, _ = policy_loss(logp, old, adv, mask, "grpo", backend="torch")
    with_kl, m = policy_loss(logp, old, adv, mask, "grpo", ref_logp=ref, kl_coef=0.1, kl_kind="k1", backend=backend)
    kl_term = aggregate(logp - ref, mask, "token-mean")
    assert float(with_kl) == pytest.approx(float(base + 0.1 * kl_term), rel=1e-6)
    assert float(m["kl_mean"]) == pytest.approx(0.3, rel=1e-6)
    entropy = torch.rand(logp.shape, dtype=torch.float64)
    with_entropy, _ = policy_loss(logp, old, adv, mask, "grpo", entropy=entropy, entropy_coef=0.01, backend=backend)
    assert float(with_entropy) == pytest.approx(float(base - 0.01 * aggregate(entropy, mask, "token-mean")), rel=1e-6)


def test_metrics_are_means_of_the_local_sums():
    logp, old, adv, mask = _batch(5)
    _, m = policy_loss(logp, old, adv, mask, "grpo", backend="torch")
    ratio = (logp - old).exp()[mask]
    assert float(m["tokens"]) == mask.sum()
    assert float(m["ratio_mean"]) == pytest.approx(float(ratio.mean()), rel=1e-6)  # stats are float32
    assert float(m["ratio_max"]) == pytest.approx(float(ratio.max()), rel=1e-6)
    assert float(m["approx_kl"]) == pytest.approx(float((old - logp)[mask].mean()), rel=1e-6)


def test_bad_arguments_are_named():
    logp, old, adv, mask = _batch(6)
    with pytest.raises(UnknownNameError, match="did you mean 'gspo'"):
        policy_loss(logp, old, adv, mask, "gsp")
    with pytest.raises(ValueError, match="no clip range"):
        policy_loss(logp, old, adv, mask, "vanilla", clip_low=0.2)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="unknown loss backend"):
        policy_loss(logp, old, adv, mask, backend="cuda")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        policy_loss(logp, old, adv, mask, agg="mean")
    assert GlobalCounts(1, 1).tokens == 1
