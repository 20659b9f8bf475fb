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


def test_k3_clamps_and_k3_plus_is_straight_through():
    logp = torch.tensor([[-30.0, -1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, -1.0, -25.0]], dtype=torch.float64)
    k3 = kl(logp, ref, "k3")
    assert float(k3[0, 0].detach()) == 10.0  # exp(20) - 21 clamped to 10
    assert float(k3[0, 1].detach()) == 0.0
    k3p = kl(logp, ref, "k3+")
    torch.testing.assert_close(k3p, k3.detach())
    (grad,) = torch.autograd.grad(k3p.sum(), logp)
    torch.testing.assert_close(grad, torch.ones_like(grad))  # k1's gradient
    with pytest.raises(UnknownNameError, match="did you mean 'k3'"):
        kl(logp, ref, "k4")


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
