"""Benchmark evaluation: loaders of the published benchmark files, rule-based scoring, statistics.

loading          shared reading of Parquet / JSON(L) benchmark files, images, options; the registry
math_benchmarks  MathVista, MathVerse, MathVision, WeMath
mmmu_hallusion   MMMU, MMMU-Pro (standard / vision), HallusionBench (+ its aAcc/qAcc/fAcc)
scoring          routing of each record to the reward it names (``megatron_prism.rewards``)
evaluate         k-sample evaluation: mean accuracy, std over samples, unbiased pass@k, report
"""

from pathlib import Path
from typing import Any

from megatron_prism.data.records import Record
from megatron_prism.eval import math_benchmarks as _math  # noqa: F401  (registers loaders)
from megatron_prism.eval import mmmu_hallusion as _mmmu  # noqa: F401  (registers loaders)
from megatron_prism.eval.evaluate import (
    BenchmarkResult,
    EvalReport,
    Generate,
    ItemResult,
    evaluate,
    paired_comparison,
    pass_at_k,
    summarize,
)
from megatron_prism.eval.loading import BENCHMARKS, BenchmarkSpec, parse_benchmark
from megatron_prism.eval.mmmu_hallusion import hallusion_accuracies
from megatron_prism.eval.scoring import RewardScorer, Scorer, accepted_answers, reward_call, scorer_from


def load_benchmark(name: str, path, **kwargs):
    """Records of benchmark ``name`` from local files at ``path`` (see each loader for kwargs)."""
    return BENCHMARKS.get(name)(path, **kwargs)


__all__ = [
    "BENCHMARKS", "BenchmarkResult", "BenchmarkSpec", "parse_benchmark", "EvalReport", "Generate", "ItemResult", "RewardScorer", "Scorer",
    "accepted_answers", "evaluate", "hallusion_accuracies", "load_benchmark", "paired_comparison", "pass_at_k",
    "reward_call", "scorer_from", "summarize",
]
