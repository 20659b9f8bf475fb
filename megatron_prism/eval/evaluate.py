"""Multi-sample evaluation over benchmarks: accuracy, its spread over samples, and pass@k.

For each benchmark the ``generate`` callable (the rollout engine; a fake one in tests) returns k
responses per record, the scorer scores them, and the report gives, with ``s[i][j]`` the score of
sample j of item i:

* ``mean_accuracy``: the mean of ``s`` over items and samples;
* ``sample_accuracies[j]`` = mean over items of ``s[i][j]`` (one "run" per sample index), and
  ``std_across_samples``, their sample standard deviation (``ddof=1``; 0 when k = 1);
* ``pass_at[k']`` for k' = 1..k: the unbiased estimator of Chen et al. (2021),
  ``1 - C(n-c, k') / C(n, k')`` with n = k samples of which c are correct, averaged over items
  (a sample is correct when its score >= ``correct_at``); pass@k is 1 for an item with any
  correct sample, and pass@1 equals the mean accuracy for 0/1 scores;
* per-item results (id, the k scores) kept for paired comparisons between reports.

The average over benchmarks is the unweighted mean of the per-benchmark figures (each benchmark
counts once, whatever its size); its std is that of the macro-averaged per-sample accuracies.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_prism.console import format_duration
from megatron_prism.data.records import Record
from megatron_prism.eval.mmmu_hallusion import hallusion_accuracies
from megatron_prism.eval.scoring import RewardScorer, Scorer

#: (records, k, temperature, seed) -> responses[i][j], k per record
Generate = Callable[[list[Record], int, float, int], list[list[str]]]

#: benchmark-specific extra metrics by record source: fn(records, {id: scores}) -> {name: value}
EXTRA_METRICS: dict[str, Callable[[list[Record], dict[str, list[float]]], dict[str, float]]] = {
    "hallusion_bench": hallusion_accuracies,
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n-c, k) / C(n, k)`` (stable product form)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class ItemResult:
    id: str
    scores: list[float]


@dataclass
class BenchmarkResult:
    name: str
    n_items: int
    k: int
    mean_accuracy: float
    sample_accuracies: list[float]
    std_across_samples: float
    pass_at: dict[int, float]
    items: list[ItemResult] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    benchmarks: dict[str, BenchmarkResult]
    average: dict[str, Any]
    k: int
    temperature: float
    seed: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (pass@k keys become strings)."""
        out = asdict(self)
        for bench in out["benchmarks"].values():
            bench["pass_at"] = {str(k): v for k, v in bench["pass_at"].items()}
        out["average"]["pass_at"] = {str(k): v for k, v in out["average"]["pass_at"].items()}
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return path

    def table(self) -> str:
        """A fixed-width table: items, mean accuracy ± std over samples, pass@1 and pass@k, in %."""
        k = self.k
        head = f"{'benchmark':<18} {'items':>6} {'acc (%)':>15} {'pass@1':>7} {f'pass@{k}':>7}"
        lines = [f"k={k} temperature={self.temperature} seed={self.seed}", head, "-" * len(head)]
        rows = [(n, b.n_items, b.mean_accuracy, b.std_across_samples, b.pass_at) for n, b in self.benchmarks.items()]
        avg = self.average
        rows.append(("average", avg["n_items"], avg["mean_accuracy"], avg["std_across_samples"], avg["pass_at"]))
        for i, (name, n, acc, std, passes) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(head))
            lines.append(f"{name:<18} {n:>6} {100 * acc:>8.2f} ± {100 * std:<4.2f} "
                         f"{100 * passes[1]:>7.2f} {100 * passes[k]:>7.2f}")
        for name, bench in self.benchmarks.items():
            if bench.extra:
                lines.append(f"{name}: " + ", ".join(f"{m} {100 * v:.2f}" for m, v in bench.extra.items()))
        return "\n".join(lines)


def summarize(name: str, records: list[Record], scores: list[list[float]], *,
              correct_at: float = 1.0) -> BenchmarkResult:
    """The statistics of one benchmark from its score matrix (items x k samples)."""
    if not records:
        raise ValueError(f"benchmark {name!r} has no items")
    k = len(scores[0])
    if k < 1 or any(len(row) != k for row in scores) or len(scores) != len(records):
        raise ValueError(f"benchmark {name!r}: scores must be {len(records)} rows of the same k >= 1 samples")
    n = len(records)
    sample_acc = [sum(row[j] for row in scores) / n for j in range(k)]
    correct = [sum(s >= correct_at - 1e-9 for s in row) for row in scores]
    pass_at = {kk: sum(pass_at_k(k, c, kk) for c in correct) / n for kk in range(1, k + 1)}
    by_id = {r.id: row for r, row in zip(records, scores)}
    sources = {r.source for r in records}
    source = sources.pop() if len(sources) == 1 else None
    extra = EXTRA_METRICS[source](records, by_id) if source in EXTRA_METRICS else {}
    return BenchmarkResult(
        name=name, n_items=n, k=k, mean_accuracy=sum(sample_acc) / k, sample_accuracies=sample_acc,
        std_across_samples=statistics.stdev(sample_acc) if k > 1 else 0.0, pass_at=pass_at,
        items=[ItemResult(r.id, list(row)) for r, row in zip(records, scores)], extra=extra,
    )


def evaluate(benchmarks: dict[str, list[Record]], generate: Generate, *, k: int = 1, temperature: float = 0.0,
             seed: int = 0, scorer: Scorer | None = None, correct_at: float = 1.0,
             progress: Callable[[str], None] | None = None) -> EvalReport:
    """Generates k responses per item of every benchmark, scores them, and reports (see module doc).

    ``scorer`` defaults to :class:`RewardScorer` (the rewards each record names). The same ``seed``
    is given to ``generate`` for every benchmark. ``progress`` (e.g. ``print``) receives one line
    as each benchmark starts and one as it ends, with its figures and the time left (estimated
    from the time per sample so far).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate")
    scorer = scorer if scorer is not None else RewardScorer()
    results: dict[str, BenchmarkResult] = {}
    total = sum(len(r) for r in benchmarks.values())
    done, started = 0, time.perf_counter()
    for index, (name, records) in enumerate(benchmarks.items(), start=1):
        if not records:
            raise ValueError(f"benchmark {name!r} has no items")
        where = f"[eval] {name} ({index}/{len(benchmarks)})"
        if progress is not None:
            progress(f"{where}: {len(records)} items x {k} sample{'s' if k > 1 else ''} at temperature {temperature:g}")
        bench_start = time.perf_counter()
        responses = generate(records, k, temperature, seed)
        if len(responses) != len(records) or any(len(outs) != k for outs in responses):
            raise ValueError(f"generate returned {[len(o) for o in responses][:8]}... responses for {name!r}; "
                             f"expected {len(records)} lists of {k}")
        scores = scorer(records, responses)
        results[name] = summarize(name, records, scores, correct_at=correct_at)
        done += len(records)
        if progress is not None:
            r, now = results[name], time.perf_counter()
            left = (now - started) / done * (total - done)
            eta = f"; eta {format_duration(left)} for {total - done} more items" if done < total else ""
            progress(f"{where}: accuracy {100 * r.mean_accuracy:.2f}% ± {100 * r.std_across_samples:.2f}, "
                     f"pass@{k} {100 * r.pass_at[k]:.2f}% in {format_duration(now - bench_start)}{eta}")
    return EvalReport(benchmarks=results, average=_average(results, k), k=k, temperature=temperature, seed=seed)


def _average(results: dict[str, BenchmarkResult], k: int) -> dict[str, Any]:
    benches = list(results.values())
    macro = [sum(b.sample_accuracies[j] for b in benches) / len(benches) for j in range(k)]
    return {
        "n_benchmarks": len(benches), "n_items": sum(b.n_items for b in benches),
        "mean_accuracy": sum(b.mean_accuracy for b in benches) / len(benches), "sample_accuracies": macro,
        "std_across_samples": statistics.stdev(macro) if k > 1 else 0.0,
        "pass_at": {kk: sum(b.pass_at[kk] for b in benches) / len(benches) for kk in range(1, k + 1)},
    }


def paired_comparison(a: BenchmarkResult, b: BenchmarkResult) -> dict[str, float]:
    """Paired difference b - a of per-item mean scores over the items both have (mean, std error, n)."""
    sa = {it.id: sum(it.scores) / len(it.scores) for it in a.items}
    diffs = [sum(it.scores) / len(it.scores) - sa[it.id] for it in b.items if it.id in sa]
    if not diffs:
        raise ValueError(f"{a.name} and {b.name} share no items")
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return {"n": len(diffs), "mean_diff": sum(diffs) / len(diffs), "std_error": se}
