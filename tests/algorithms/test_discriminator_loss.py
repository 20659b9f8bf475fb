"""The per-part Bradley-Terry discriminator loss: values against a per-pair loop, gradients against
closed forms derived by hand and gradcheck (float64, fresh random inputs), masking, the global
valid count, the no-valid fallback and the metrics."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_prism.algorithms import DISCRIMINATOR_LOSSES, bradley_terry_loss, discriminator_loss
from megatron_prism.registry import UnknownNameError


def _inputs(seed: int, batch: int = 9, parts: int = 2, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(batch, parts, generator=g, dtype=torch.float64) * scale).requires_grad_()
    policy = (torch.randn(batch, parts, generator=g, dtype=torch.float64) * scale).requires_grad_()
    valid = torch.rand(batch, generator=g) > 0.3
    valid[0] = True  # at least one valid pair
    return teacher, policy, valid


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _loop_loss(t, s, valid, *, l2: float, reduction: str) -> float:
    """The loss written pair by pair from its definition."""
    batch, parts = t.shape
    part_losses = []
    for p in range(parts):
        terms = [-math.log(_sigmoid(float(t[i, p] - s[i, p]))) for i in range(batch) if valid[i]]
        part_losses.append(sum(terms) / len(terms))
    total = sum(part_losses) if reduction == "sum" else sum(part_losses) / parts
    squares = [float(x) ** 2 for x in t.reshape(-1)]
    squares += [float(s[i, p]) ** 2 for i in range(batch) for p in range(parts) if valid[i]]
    return total + l2 * sum(squares) / len(squares)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_value_matches_pairwise_loop(seed, reduction):
    teacher, policy, valid = _inputs(seed)
    loss, metrics = bradley_terry_loss(teacher, policy, valid, score_l2=0.01, part_reduction=reduction)
    expected = _loop_loss(teacher.detach(), policy.detach(), valid, l2=0.01, reduction=reduction)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["disc/loss"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradients_match_closed_form(seed, reduction):
    """dL/dt_ip = -c (1 - sigma(t_ip - s_ip)) m_i / N_p + l2 * 2 t_ip / D and
    dL/ds_ip = +c (1 - sigma(t_ip - s_ip)) m_i / N_p + l2 * 2 s_ip m_i / D,
    with c = 1 (sum) or 1/P (mean), N_p the valid pairs and D = B*P + P*sum(m) the squared scores."""
    teacher, policy, valid = _inputs(seed)
    l2 = 0.05
    loss, _ = bradley_terry_loss(teacher, policy, valid, score_l2=l2, part_reduction=reduction)
    loss.backward()
    batch, parts = teacher.shape
    m = valid.double().unsqueeze(1).expand(batch, parts)
    c = 1.0 if reduction == "sum" else 1.0 / parts
    n = m.sum(0)
    d = batch * parts + m.sum()
    t, s = teacher.detach(), policy.detach()
    one_minus = 1.0 - torch.sigmoid(t - s)
    expected_t = -c * one_minus * m / n + l2 * 2 * t / d
    expected_s = c * one_minus * m / n + l2 * 2 * s * m / d
    torch.testing.assert_close(teacher.grad, expected_t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(policy.grad, expected_s, rtol=1e-12, atol=1e-14)
    assert torch.all(policy.grad[~valid] == 0)  # an invalid response gets no gradient at all


def _oracle_bt(t, s, valid, *, l2, clip, reduction, num_valid=None):
    """float64 Bradley-Terry from the definition, for autograd: per part p,
    sum_{i valid} log(1 + exp(-(t_ip - s_ip))) / N_p, summed or averaged over parts, plus
    l2 * mean of the squared teacher scores and valid policy scores (scores clamped first)."""
    if clip is not None:
        t, s = t.clamp(-clip, clip), s.clamp(-clip, clip)
    m = valid.double()
    n = m.sum(0) if num_valid is None else torch.as_tensor(num_valid, dtype=torch.float64)
    per_part = (torch.log1p(torch.exp(-(t - s))) * m).sum(0) / n
    total = per_part.sum() if reduction == "sum" else per_part.mean()
    squares = (t ** 2).sum() + (s ** 2 * m).sum()
    return total + l2 * squares / (t.numel() + m.sum())


@pytest.mark.parametrize("seed", [10, 11, 12])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradients_match_float64_autograd_oracle(seed, reduction):
    """Per-part validity, score clip (some scores beyond it), L2, and a global valid count: value
    and both gradients against autograd through the formula above."""
    teacher, policy, _ = _inputs(seed, batch=11, scale=4.0)
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(11, 2, generator=g) > 0.3
    valid[0] = True
    num_valid = (valid.sum(0) + torch.tensor([3, 5])).tolist()  # as if other ranks held more pairs
    kw = dict(l2=0.03, clip=5.0, reduction=reduction)
    t, s = teacher.detach().clone().requires_grad_(), policy.detach().clone().requires_grad_()
    expected = _oracle_bt(t, s, valid, num_valid=num_valid, **kw)
    want_t, want_s = torch.autograd.grad(expected, (t, s))
    loss, _ = bradley_terry_loss(teacher, policy, valid, score_l2=0.03, score_clip=5.0, part_reduction=reduction,
                                 num_valid=num_valid)
    got_t, got_s = torch.autograd.grad(loss, (teacher, policy))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got_s, want_s, rtol=1e-12, atol=1e-15)
    assert (teacher.abs() > 5.0).any() and (want_t == 0).any()  # the clip's zero gradient was exercised


def test_gradcheck_with_clip_and_l2():
    teacher, policy, valid = _inputs(5, batch=5, scale=1.0)
    fn = lambda t, s: bradley_terry_loss(t, s, valid, score_l2=0.1, score_clip=2.5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (teacher, policy))


def test_clip_stops_the_gradient_beyond_it():
    teacher = torch.tensor([[12.0, 0.5]], dtype=torch.float64, requires_grad=True)
    policy = torch.tensor([[-11.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss, metrics = bradley_terry_loss(teacher, policy, torch.tensor([True]), score_clip=10.0)
    loss.backward()
    assert teacher.grad[0, 0] == 0 and policy.grad[0, 0] == 0
    assert teacher.grad[0, 1] != 0
    assert metrics["disc/caption/gap"] == pytest.approx(20.0)  # clipped to 10 - (-10)


def test_global_valid_count_makes_the_loss_split_invariant():
    teacher, policy, valid = _inputs(6, batch=10)
    full, _ = bradley_terry_loss(teacher, policy, valid)
    count = valid.double().sum().repeat(2)
    halves = [bradley_terry_loss(teacher[sl], policy[sl], valid[sl], num_valid=count)[0]
              for sl in (slice(0, 4), slice(4, 10))]
    assert sum(halves).item() == pytest.approx(full.item(), rel=1e-12)


def test_per_part_validity_mask():
    teacher, policy, _ = _inputs(7, batch=6)
    valid = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    loss, _ = bradley_terry_loss(teacher, policy, valid)
    expected = 0.0
    for p in range(2):
        rows = [i for i in range(6) if valid[i, p]]
        expected += sum(-math.log(_sigmoid((teacher[i, p] - policy[i, p]).item())) for i in rows) / len(rows)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_no_valid_pair_falls_back_and_reports_nan_accuracy():
    teacher = torch.tensor([[1.0, -2.0], [3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    policy = torch.tensor([[5.0, 5.0], [5.0, 5.0]], dtype=torch.float64, requires_grad=True)
    loss, metrics = bradley_terry_loss(teacher, policy, torch.tensor([False, False]), fallback_coef=0.01)
    expected = 0.01 * (-math.log(_sigmoid(2.0)) - math.log(_sigmoid(-1.0)))  # means 2.0 and -1.0
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert (policy.grad is None or torch.all(policy.grad == 0)) and torch.all(teacher.grad < 0)  # pushes teacher scores up
    assert math.isnan(metrics["disc/caption/acc"]) and math.isnan(metrics["disc/reasoning/gap"])
    assert metrics["disc/valid_ratio"] == 0.0


def test_metrics_on_a_hand_built_batch():
    teacher = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [9.0, 9.0]])
    policy = torch.tensor([[1.0, 2.0], [0.5, 1.0], [0.0, 0.0], [-9.0, -9.0]])
    valid = torch.tensor([True, True, True, False])
    _, m = bradley_terry_loss(teacher, policy, valid)
    assert m["disc/caption/acc"] == pytest.approx(2 / 3) and m["disc/reasoning/acc"] == pytest.approx(2 / 3)
    assert m["disc/caption/gap"] == pytest.approx((1.0 - 0.5 + 1.0) / 3)
    assert m["disc/reasoning/gap"] == pytest.approx((-1.0 + 2.0 + 1.0) / 3)
    assert m["disc/caption/policy_mean"] == pytest.approx(0.5)
    assert m["disc/valid_ratio"] == pytest.approx(0.75)


def test_registry_and_bad_input():
    assert "bradley_terry" in DISCRIMINATOR_LOSSES
    t, s, v = _inputs(8)
    assert float(discriminator_loss("bradley_terry", t, s, v)[0]) == float(bradley_terry_loss(t, s, v)[0])
    with pytest.raises(UnknownNameError, match="did you mean 'bradley_terry'"):
        discriminator_loss("bradley_terri", t, s, v)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        bradley_terry_loss(t[:, 0], s[:, 0], v)
    with pytest.raises(ValueError, match="valid must be"):
        bradley_terry_loss(t, s, v[:3])
    with pytest.raises(ValueError, match="part_reduction"):
        bradley_terry_loss(t, s, v, part_reduction="max")
