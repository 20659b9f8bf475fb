"""Statistics of an experiment: mean +- std over seeds, and paired comparisons of two arms over the
same evaluation items and seeds (numpy only; the Student t tail via the regularised incomplete beta
function, so scipy is not a dependency).

A comparison starts from a difference matrix ``D[s, i] = score_arm[s, i] - score_baseline[s, i]``:
seed s of both arms (same ``run.seed``) evaluated on item i, a score being the item's mean
correctness over its k samples. Two sources of noise matter: which items the benchmark happens to
hold, and which seed the training run drew. Hence:

* ``paired_t_test`` over **items** uses ``d_i = mean_s D[s, i]`` (the unit is the item; taking the
  (seed, item) cells as independent would count each seed's shared training noise many times);
* ``paired_t_test`` over **seeds** uses ``d_s = mean_i D[s, i]`` (the unit is the training run);
* ``paired_bootstrap_ci`` resamples seeds *and* items with replacement (a two-level bootstrap,
  Davison & Hinkley 1997, sec. 3.8), so its interval carries both variances. For a macro average
  over benchmarks the seeds are resampled once (a seed's run is evaluated on every benchmark) and
  items within each benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_std of no values")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Press et al.,
    Numerical Recipes, 3rd ed., sec. 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)`` for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1 (got a={a}, b={b}, x={x})")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t: ``P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)``."""
    if math.isnan(t) or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass
class TTest:
    n: int
    mean_diff: float
    std_error: float
    t: float
    df: int
    p_value: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def paired_t_test(diffs: Sequence[float]) -> TTest:
    """Paired t-test of per-unit differences against 0: ``t = mean / (sd / sqrt(n))``, df = n - 1.

    With fewer than two units t and p are NaN; with zero spread t is 0 (p = 1) for a zero mean and
    +-inf (p = 0) otherwise."""
    d = np.asarray(diffs, dtype=np.float64)
    n = int(d.size)
    if n == 0:
        raise ValueError("paired_t_test of no differences")
    mean = float(d.mean())
    if n < 2:
        return TTest(n, mean, float("nan"), float("nan"), 0, float("nan"))
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    return TTest(n, mean, se, t, n - 1, t_two_sided_p(t, n - 1))


def paired_bootstrap_ci(diffs: np.ndarray | Sequence[np.ndarray], *, n_boot: int = 10_000, alpha: float = 0.05,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the mean difference, resampling seeds and items (see the module doc).

    ``diffs`` is one ``[S, I]`` matrix, or a list of ``[S, I_b]`` matrices (one per benchmark, the
    same S seeds) whose statistic is the unweighted mean over benchmarks of their means."""
    mats = [np.asarray(diffs, dtype=np.float64)] if isinstance(diffs, np.ndarray) else \
        [np.asarray(m, dtype=np.float64) for m in diffs]
    if not mats or any(m.ndim != 2 or m.size == 0 for m in mats):
        raise ValueError("paired_bootstrap_ci needs non-empty [seeds, items] matrices")
    seeds = mats[0].shape[0]
    if any(m.shape[0] != seeds for m in mats):
        raise ValueError(f"every benchmark needs the same seeds; got {[m.shape[0] for m in mats]}")
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=n_boot)  # [B, S]
    stats = np.zeros(n_boot)
    for m in mats:
        items = m.shape[1]
        item_counts = rng.multinomial(items, np.full(items, 1.0 / items), size=n_boot)  # [B, I]
        # mean of m[S*][:, I*] = (seed counts)^T m (item counts) / (S * I)
        stats += np.einsum("bs,si,bi->b", seed_counts, m, item_counts) / (seeds * items)
    stats /= len(mats)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def compare(arm: np.ndarray, baseline: np.ndarray, *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Everything the report gives for one arm vs the baseline on one benchmark: ``arm`` and
    ``baseline`` are ``[S, I]`` per-item scores with matched seeds (rows) and items (columns)."""
    arm, baseline = np.asarray(arm, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if arm.shape != baseline.shape or arm.ndim != 2:
        raise ValueError(f"arm and baseline scores must be the same [seeds, items]; got {arm.shape} and {baseline.shape}")
    d = arm - baseline
    lo, hi = paired_bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return {"mean_diff": float(d.mean()), "ci95": [lo, hi], "n_seeds": int(d.shape[0]), "n_items": int(d.shape[1]),
            "t_items": paired_t_test(d.mean(axis=0)).to_json(),
            "t_seeds": paired_t_test(d.mean(axis=1)).to_json() if d.shape[0] > 1 else None}
