"""Experiment statistics against hand-computed values and closed forms: mean/std, the Student t tail
(df 1 and 2 have closed forms), a paired t-test worked by hand, and bootstrap intervals on
constructed arms that differ and that do not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_prism.experiments.stats import (
    betainc,
    compare,
    mean_std,
    paired_bootstrap_ci,
    paired_t_test,
    t_two_sided_p,
)


def test_mean_std():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)), rel=1e-12)
    assert mean_std([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.0, -4.0])
def test_t_tail_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has P(|T| >= t) = 1 - |t| / sqrt(t^2 + 2)
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), rel=1e-10, abs=1e-14)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-10, abs=1e-14)


def test_betainc_identities():
    # I_x(1, 1) = x; I_x(a, 1) = x^a; symmetry I_x(a, b) = 1 - I_{1-x}(b, a)
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert betainc(3.5, 1, x) == pytest.approx(x ** 3.5, abs=1e-14)
        assert betainc(2.5, 7.0, x) == pytest.approx(1 - betainc(7.0, 2.5, 1 - x), abs=1e-13)
    with pytest.raises(ValueError):
        betainc(0, 1, 0.5)


def test_t_tail_against_scipy():
    from scipy import stats  # a test-only reference (the package itself does not need scipy)

    for df in (3, 7, 30, 250):
        for t in (0.1, 1.7, 3.2, 6.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)


def test_paired_t_test_hand_computed():
    # d = [1, 2, 4]: mean 7/3, sample variance (16 + 1 + 25) / 9 / 2 = 7/3, se = sqrt(7/9),
    # t = (7/3) / sqrt(7/9) = sqrt(7), df 2, p = 1 - sqrt(7) / sqrt(7 + 2) = 1 - sqrt(7) / 3
    r = paired_t_test([1.0, 2.0, 4.0])
    assert (r.n, r.df) == (3, 2)
    assert r.mean_diff == pytest.approx(7 / 3)
    assert r.std_error == pytest.approx(math.sqrt(7 / 9))
    assert r.t == pytest.approx(math.sqrt(7), rel=1e-12)
    assert r.p_value == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-10)


def test_paired_t_test_degenerate_cases():
    assert paired_t_test([0.0, 0.0, 0.0]).p_value == 1.0
    r = paired_t_test([0.5, 0.5])
    assert r.t == math.inf and r.p_value == 0.0
    r = paired_t_test([0.2])
    assert math.isnan(r.t) and math.isnan(r.p_value) and r.mean_diff == 0.2


def test_bootstrap_of_a_constant_difference_is_that_constant():
    lo, hi = paired_bootstrap_ci(np.full((3, 20), 0.25), n_boot=500)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def _arm_scores(rng, seeds, items, p_correct):
    return (rng.random((seeds, items)) < p_correct).astype(np.float64)


def test_compare_detects_a_constructed_difference():
    rng = np.random.default_rng(1)
    base = _arm_scores(rng, 3, 400, 0.4)
    better = np.maximum(base, _arm_scores(rng, 3, 400, 0.3))  # fixes ~30% of the baseline's misses
    out = compare(better, base, n_boot=2000)
    assert out["mean_diff"] == pytest.approx(float((better - base).mean()))
    assert out["mean_diff"] > 0.1
    assert out["ci95"][0] > 0  # the interval excludes no difference
    assert out["t_items"]["p_value"] < 1e-6
    assert out["n_seeds"] == 3 and out["n_items"] == 400 and out["t_seeds"]["df"] == 2


def test_compare_of_identically_distributed_arms_finds_nothing():
    rng = np.random.default_rng(2)
    a, b = _arm_scores(rng, 2, 300, 0.5), _arm_scores(rng, 2, 300, 0.5)
    out = compare(a, b, n_boot=2000)
    assert out["ci95"][0] < 0 < out["ci95"][1]
    assert out["t_items"]["p_value"] > 0.05
    same = compare(a, a, n_boot=200)
    assert same["mean_diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["t_items"]["p_value"] == 1.0


def test_bootstrap_macro_average_over_benchmarks_and_seed_noise():
    # two benchmarks of different sizes: the statistic is the unweighted mean of their means
    small, large = np.full((2, 5), 1.0), np.zeros((2, 500))
    lo, hi = paired_bootstrap_ci([small, large], n_boot=300)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    # a difference that exists only between seeds (every item of seed 0 +1, of seed 1 -1) has an
    # interval as wide as the seed spread, although every item agrees within a seed
    seeds_only = np.stack([np.ones(200), -np.ones(200)])
    lo, hi = paired_bootstrap_ci(seeds_only, n_boot=2000)
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap_ci([np.zeros((2, 3)), np.zeros((3, 3))])
