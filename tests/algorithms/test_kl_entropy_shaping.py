"""KL estimators, entropy (plain and chunked), overlong shaping and the dynamic-sampling filter."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_prism.algorithms import (
    GroupRefillBuffer,
    entropy_from_logits,
    entropy_from_logits_chunked,
    kl,
    shape_rewards,
)
from megatron_prism.algorithms.sampling import drop_uniform_groups
from megatron_prism.registry import UnknownNameError


def _pair(seed, shape=(3, 17)):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 5
    ref = -torch.rand(shape, generator=g, dtype=torch.float64) * 5
    return logp, ref


def test_kl_values_follow_schulman_definitions():
    logp, ref = _pair(0)
    log_r = ref - logp
    torch.testing.assert_close(kl(logp, ref, "k1"), -log_r, rtol=0, atol=0)
    torch.testing.assert_close(kl(logp, ref, "abs"), log_r.abs(), rtol=0, atol=0)
    torch.testing.assert_close(kl(logp, ref, "k2"), 0.5 * log_r**2, rtol=0, atol=0)
    expected_k3 = torch.tensor([[min(math.exp(x) - x - 1, 10.0) for x in row] for row in log_r.tolist()], dtype=torch.float64)
    torch.testing.assert_close(kl(logp, ref, "k3"), expected_k3, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl(logp, ref, "low_var_kl"), expected_k3, rtol=1e-12, atol=1e-12)
    assert (kl(logp, ref, "k3") >= 0).all()


def test_k3_clamps_and_plus_kinds_are_straight_through_k2():
    logp = torch.tensor([[-30.0, -1.0, 0.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, -1.0, -25.0, -0.5]], dtype=torch.float64)
    k3 = kl(logp, ref, "k3")
    assert float(k3[0, 0].detach()) == 10.0  # exp(20) - 21 clamped to 10
    assert float(k3[0, 1].detach()) == 0.0
    for plus, base in (("k3+", "k3"), ("low_var_kl+", "k3"), ("k1+", "k1"), ("kl+", "k1"), ("abs+", "abs")):
        value = kl(logp, ref, plus)
        torch.testing.assert_close(value, kl(logp, ref, base).detach(), rtol=0, atol=0)
        (grad,) = torch.autograd.grad(value.sum(), logp)
        # verl's kl_penalty: the gradient of k2 = (logp - ref)^2 / 2, i.e. logp - ref
        torch.testing.assert_close(grad, (logp - ref).detach(), rtol=0, atol=0)
    with pytest.raises(UnknownNameError, match="did you mean 'k3'"):
        kl(logp, ref, "k4")
    with pytest.raises(ValueError, match="differ in shape"):
        kl(logp, ref[:, :2], "k3")


def _categorical_kl_gradients(kind: str, seed: int, n: int = 6):
    """On an n-way categorical pi = softmax(theta): the exact expectation over x ~ pi of the gradient
    of the per-sample estimate kl(log pi(x), log ref(x)), and the true gradient of KL(pi || ref),
    both by float64 autograd; the latter from the full-distribution formula sum pi (log pi - log ref)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    log_pi = torch.log_softmax(theta, 0)
    pi = log_pi.exp().detach()  # the sampling distribution: its weights carry no gradient
    samples = kl(log_pi[None, :], log_ref[None, :], kind)[0]  # the estimate for each outcome x
    (estimated,) = torch.autograd.grad((pi * samples).sum(), theta, retain_graph=True)
    true_kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    (exact,) = torch.autograd.grad(true_kl, theta)
    return estimated, exact


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plus_estimators_give_the_kl_gradient_in_expectation(seed):
    """Why "+" exists: as a loss term, E_pi[grad k(x)] must be grad KL(pi || ref). k1 gives exactly
    zero (E_pi[grad log pi] = 0) and k3 a wrong vector; k1+ and k3+ (k2's gradient) give the KL's."""
    for kind in ("k1+", "k3+", "k2"):
        estimated, exact = _categorical_kl_gradients(kind, seed)
        torch.testing.assert_close(estimated, exact, rtol=1e-12, atol=1e-14)
    estimated, exact = _categorical_kl_gradients("k1", seed)
    assert estimated.abs().max() < 1e-15 < exact.abs().max() * 1e-3
    estimated, exact = _categorical_kl_gradients("k3", seed)
    assert (estimated - exact).abs().max() > 1e-3 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_entropy_plain_and_chunked_match_float64_definition(dtype):
    g = torch.Generator().manual_seed(1)
    logits64 = torch.randn(2, 13, 37, generator=g, dtype=torch.float64) * 3
    logits = logits64.to(dtype).requires_grad_(True)
    reference_in = logits.detach().double().requires_grad_(True)
    p = torch.softmax(reference_in, -1)
    expected = -(p * torch.log_softmax(reference_in, -1)).sum(-1)  # -sum p log p
    weights = torch.randn(2, 13, generator=g, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), reference_in)
    tol = 1e-6 if dtype == torch.float64 else 1e-4  # both compute in fp32
    for fn in (entropy_from_logits, lambda x: entropy_from_logits_chunked(x, chunk_rows=5)):
        out = fn(logits)
        assert out.dtype == torch.float32 and out.shape == (2, 13)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
        (grad,) = torch.autograd.grad((out.double() * weights).sum(), logits)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2 if dtype == torch.bfloat16 else tol,
                                   atol=1e-2 if dtype == torch.bfloat16 else tol)


def test_overlong_penalty_is_linear_over_the_buffer():
    rewards = torch.ones(5)
    lengths = torch.tensor([10, 60, 80, 100, 130])
    shaped = shape_rewards("dapo_overlong", rewards, lengths, max_response_length=100, overlong_buffer=40,
                           penalty_factor=0.5)
    # free up to 60 tokens, then -(L - 60)/40 * 0.5, floor -0.5
    torch.testing.assert_close(shaped, torch.tensor([1.0, 1.0, 0.75, 0.5, 0.5]))
    with pytest.raises(ValueError, match="overlong_buffer"):
        shape_rewards("dapo_overlong", rewards, lengths, max_response_length=100, overlong_buffer=0)


def test_dynamic_sampling_drops_uniform_groups_and_refills():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    ids = ["a", "a", "b", "b", "c", "c", "d"]
    assert drop_uniform_groups(rewards, ids).tolist() == [False, False, True, True, False, False, False]

    buffer = GroupRefillBuffer("dapo_dynamic", groups_wanted=2, max_rounds=3)
    assert not buffer.add(list("abcdefg"), rewards, ids)  # one group passes
    assert buffer.add(["x1", "x2", "y1", "y2"], torch.tensor([0.0, 1.0, 1.0, 0.0]), [1, 1, 2, 2])
    taken = buffer.take()
    assert taken == [["c", "d"], ["x1", "x2"]]
    assert buffer.dropped_groups == 3

    stuck = GroupRefillBuffer("dapo_dynamic", groups_wanted=1, max_rounds=2)
    stuck.add(["p", "q"], torch.ones(2), [0, 0])
    with pytest.raises(RuntimeError, match="after 2 generation rounds"):
        stuck.add(["p", "q"], torch.ones(2), [0, 0])
