"""policy_loss: each variant against the papers' formulas written as plain loops (values) and as a
float64 autograd oracle written out here (gradients, GSPO's stop-gradient structure included), the
variants' defaults (verl's), split invariance over micro-batches / ranks, and the Triton backend
through the API."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_prism.algorithms import AGG_MODES, GlobalCounts, aggregate, local_counts, policy_loss
from megatron_prism.registry import UnknownNameError
from tests.kl_oracle import kl_estimate as _oracle_kl

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
        ("grpo", {}, _loop_token_surrogate(logp, old, adv, mask, 0.2, 0.2, dual=3.0)),
        ("vanilla", {}, _loop_token_surrogate(logp, old, adv, mask, 0.2, 0.2, dual=3.0)),
        ("ppo", {"clip_low": 0.1}, _loop_token_surrogate(logp, old, adv, mask, 0.1, 0.1, dual=3.0)),
        ("ppo", {"dual_clip": math.inf}, _loop_token_surrogate(logp, old, adv, mask, 0.2, 0.2)),
        ("dapo", {}, _loop_token_surrogate(logp, old, adv, mask, 0.2, 0.28, dual=3.0)),
        ("unclipped", {}, _loop_token_surrogate(logp, old, adv, mask, math.inf, math.inf)),
    ]
    tol = 1e-12 if backend == "torch" else 2e-6  # the kernel computes in fp32
    for variant, kw, expected in cases:
        loss, metrics = policy_loss(logp, old, adv, mask, variant, backend=backend, **kw)
        assert float(loss) == pytest.approx(expected, rel=tol, abs=tol), variant
        assert 0.0 < float(metrics["clip_frac"]) < 1.0 or variant == "unclipped"
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
@pytest.mark.parametrize("variant", ["grpo", "dapo", "gspo", "unclipped"])
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


# ------------------------------------------------------------------ float64 autograd oracle
_DEFAULTS = {  # variant -> (clip_low, clip_high, dual_clip, aggregation, sequence ratio): verl's
    "grpo": (0.2, 0.2, 3.0, "token-mean", False), "ppo": (0.2, 0.2, 3.0, "token-mean", False),
    "vanilla": (0.2, 0.2, 3.0, "token-mean", False), "dapo": (0.2, 0.28, 3.0, "token-mean", False),
    "gspo": (3e-4, 4e-4, None, "seq-mean-token-mean", True),
    "unclipped": (math.inf, math.inf, None, "token-mean", False),
}


def _oracle_loss(variant, logp, old, adv, mask, *, agg=None, norm_len=None, ref=None, kl_coef=0.0, kl_kind="k3",
                 entropy=None, entropy_coef=0.0, clip_low=None, clip_high=None):
    """The whole-batch loss from the papers' formulas, float64, differentiable in logp and entropy."""
    low, high, dual, default_agg, sequence = _DEFAULTS[variant]
    low = low if clip_low is None else clip_low
    high = high if clip_high is None else clip_high
    agg = agg or default_agg
    m = mask.double()
    a = adv.double()[:, None]
    lengths = m.sum(-1)
    if sequence:  # GSPO-token: value sg(s_b), gradient 1 per token, clamp at 10 (verl)
        s = ((logp - old) * m).sum(-1) / lengths.clamp(min=1)
        log_ratio = (s.detach()[:, None] + logp - logp.detach()).clamp(max=10)
    else:
        log_ratio = (logp - old).clamp(-20, 20)
    ratio = log_ratio.exp()
    token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - low, 1 + high))
    if dual is not None:
        token = torch.where(a < 0, torch.minimum(token, -a * dual), token)
    n_tokens, n_seqs = m.sum(), (lengths > 0).sum()
    weight = {"token-mean": torch.ones_like(lengths) / n_tokens,
              "seq-mean-token-sum": torch.ones_like(lengths) / n_seqs,
              "seq-mean-token-mean": 1 / (lengths.clamp(min=1) * n_seqs),
              "seq-mean-token-sum-norm": torch.ones_like(lengths) / ((norm_len or m.shape[1]) * n_seqs)}[agg][:, None]
    loss = (m * weight * token).sum()
    if ref is not None and kl_coef:
        loss = loss + kl_coef * (m * weight * _oracle_kl(logp, ref, kl_kind)).sum()
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * (m * weight * entropy).sum()
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(_DEFAULTS))
@pytest.mark.parametrize("kl_kind", ["k1", "abs", "k2", "k3", "k1+", "abs+", "k3+"])
def test_value_and_gradients_match_float64_oracle(backend, variant, kl_kind):
    """Loss and d loss / d logp, d loss / d entropy, against autograd through the oracle above, for
    every variant and KL kind, on one aggregation each (the loop over aggregations is the split test's)."""
    seed = sum(map(ord, variant + kl_kind))
    spread = 3e-4 if variant == "gspo" else 0.4  # GSPO's clip range is tiny: make both sides occur
    logp, old, adv, mask = _batch(seed, spread=spread)
    g = torch.Generator().manual_seed(seed + 1)
    ref = logp + torch.randn(logp.shape, generator=g, dtype=torch.float64)
    entropy = torch.rand(logp.shape, generator=g, dtype=torch.float64) * 3
    agg = AGG_MODES[seed % len(AGG_MODES)]
    kw = dict(agg=agg, norm_len=13, ref=ref, kl_coef=0.07, kl_kind=kl_kind, entropy_coef=0.01)
    x, e = logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
    expected = _oracle_loss(variant, x, old, adv, mask, entropy=e, **kw)
    want_logp, want_ent = torch.autograd.grad(expected, (x, e))
    y, f = logp.clone().requires_grad_(True), entropy.clone().requires_grad_(True)
    got, metrics = policy_loss(y, old, adv, mask, variant, agg=agg, norm_len=13, ref_logp=ref, kl_coef=0.07,
                               kl_kind=kl_kind, entropy=f, entropy_coef=0.01, backend=backend)
    got_logp, got_ent = torch.autograd.grad(got, (y, f))
    tol = 1e-12 if backend == "torch" else 2e-6  # the kernel computes in fp32
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=tol, abs=tol)
    scale = float(want_logp.abs().max())
    torch.testing.assert_close(got_logp, want_logp, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(got_ent, want_ent, rtol=1e-12, atol=1e-15)
    assert want_logp.abs().sum() > 0 and want_ent.abs().sum() > 0
    # the KL metric is the mean of the KL estimate over the loss tokens
    kl_tok = _oracle_kl(logp, ref, kl_kind)[mask]
    assert float(metrics["kl_mean"]) == pytest.approx(float(kl_tok.mean()), rel=1e-5, abs=1e-7)


def test_gspo_gradient_has_the_stop_gradient_structure():
    """GSPO-token: every token of row b gets -A_b * s_b * row_scale (the sequence ratio's value,
    per-token gradient one) inside the clip range, 0 outside (clipped) — not a gradient through
    the mean that defines s_b."""
    logp, old, adv, mask = _batch(21, spread=1.5e-3)
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, "gspo", backend="torch")
    (grad,) = torch.autograd.grad(loss, x)
    m = mask.double()
    lengths = m.sum(-1)
    s = (((logp - old) * m).sum(-1) / lengths.clamp(min=1)).exp()
    n_seqs = (lengths > 0).sum()
    cases = set()
    for b in range(logp.shape[0]):
        if lengths[b] == 0:
            assert torch.all(grad[b] == 0)
            continue
        a = float(adv[b])
        inside = (1 - 3e-4) <= float(s[b]) <= (1 + 4e-4)
        unclipped_side = (a > 0 and float(s[b]) < 1) or (a < 0 and float(s[b]) > 1)
        cases.add("gradient" if (inside or unclipped_side) else "clipped")
        per_token = -a * float(s[b]) / (float(lengths[b]) * float(n_seqs)) if (inside or unclipped_side) else 0.0
        torch.testing.assert_close(grad[b][mask[b]], torch.full((int(lengths[b]),), per_token, dtype=torch.float64),
                                   rtol=1e-12, atol=1e-15)
    assert cases == {"gradient", "clipped"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_and_entropy_terms(backend):
    """The KL and entropy terms add their aggregated means to the surrogate (random reference)."""
    logp, old, adv, mask = _batch(4)
    ref = logp.detach() + torch.randn(logp.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    base, _ = policy_loss(logp, old, adv, mask, "grpo", backend="torch")
    with_kl, m = policy_loss(logp, old, adv, mask, "grpo", ref_logp=ref, kl_coef=0.1, kl_kind="k1", backend=backend)
    kl_term = aggregate(logp - ref, mask, "token-mean")
    assert float(with_kl) == pytest.approx(float(base + 0.1 * kl_term), rel=1e-6)
    assert float(m["kl_mean"]) == pytest.approx(float((logp - ref)[mask].mean()), rel=1e-5)
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
        policy_loss(logp, old, adv, mask, "unclipped", clip_low=0.2)
    with pytest.raises(ValueError, match="mask selects no token"):
        policy_loss(logp, old, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="counts.tokens"):
        policy_loss(logp, old, adv, mask, counts=GlobalCounts(0, 0))
    with pytest.raises(UnknownNameError, match="KL estimator"):
        policy_loss(logp, old, adv, mask, ref_logp=logp, kl_coef=0.1, kl_kind="k5")
    with pytest.raises(ValueError, match="entropy must have"):
        policy_loss(logp, old, adv, mask, entropy=logp[:, :3], entropy_coef=0.1)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="unknown loss backend"):
        policy_loss(logp, old, adv, mask, backend="cuda")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        policy_loss(logp, old, adv, mask, agg="mean")
    assert GlobalCounts(1, 1).tokens == 1
