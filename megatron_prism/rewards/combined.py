"""Weighted, optionally format-gated combinations of an accuracy reward and the format reward.

    score = w_acc * acc * gate + w_fmt * fmt,   gate = 1 if (not format_gated or format ok) else 0

``acc`` is the accuracy reward's score (any registered reward, or a callable), ``fmt`` the format
reward's score and "format ok" its ``format_ok`` (for a custom format reward that does not set
it: ``fmt >= 1``). So with ``math_format`` (0.8 / 0.2, gated): correct and well formatted 1.0;
wrong but well formatted 0.2; anything badly formatted 0.0, however correct. Ungated, a correct
but badly formatted response would get 0.8. The accuracy part is always computed (its raw score
is in ``details["accuracy"]``, its ``extracted`` / ``timed_out`` / ``error`` are passed through),
so a trainer can log accuracy separately from the gate; ``details["format"]`` is ``fmt``.

Spec (a config mapping): ``{"accuracy": "math", "weights": {"accuracy": 0.8, "format": 0.2},
"format_gated": True, "format": "format"}``; only ``accuracy`` is required (weights default to
``{"accuracy": 1.0}``, gating to True, format to the registered ``format``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_prism.rewards.base import RewardResult, lookup_reward, register_reward
from megatron_prism.rewards.pool import PooledReward, score_batch

_SPEC_KEYS = frozenset({"accuracy", "weights", "format_gated", "format"})
_WEIGHT_KEYS = frozenset({"accuracy", "format"})


def _resolve(reward: str | Callable[..., RewardResult]) -> Callable[..., RewardResult]:
    return lookup_reward(reward) if isinstance(reward, str) else reward


@dataclass(frozen=True)
class CombinedReward:
    """``w_acc * accuracy * gate + w_fmt * format`` (see the module docstring)."""

    accuracy: str | Callable[..., RewardResult]
    weights: Mapping[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    format_gated: bool = True
    format: str | Callable[..., RewardResult] = "format"

    def __post_init__(self) -> None:
        unknown = set(self.weights) - _WEIGHT_KEYS
        if unknown:
            raise ValueError(f"unknown reward weight(s) {sorted(unknown)}; allowed: {sorted(_WEIGHT_KEYS)}")
        _resolve(self.accuracy), _resolve(self.format)  # fail early on unknown names

    def combine(self, acc: RewardResult, fmt: RewardResult) -> RewardResult:
        fmt_ok = fmt.format_ok if fmt.format_ok is not None else fmt.score >= 1.0
        gate = 1.0 if (fmt_ok or not self.format_gated) else 0.0
        w_acc, w_fmt = float(self.weights.get("accuracy", 0.0)), float(self.weights.get("format", 0.0))
        return RewardResult(
            w_acc * acc.score * gate + w_fmt * fmt.score,
            extracted=acc.extracted, format_ok=fmt_ok, timed_out=acc.timed_out, error=acc.error,
            details={"accuracy": acc.score, "format": fmt.score},
        )

    def __call__(self, response: str, answer: str, **kw: Any) -> RewardResult:
        return self.combine(_resolve(self.accuracy)(response, answer, **kw),
                            _resolve(self.format)(response, answer, **kw))

    def score_batch(self, responses: Sequence[str], answers: Sequence[str], *, timeout_s: float = 5.0,
                    workers: int = 2, item_kwargs: Sequence[Mapping[str, Any]] | None = None,
                    **kw: Any) -> list[RewardResult]:
        """Accuracy through the pool (per-item timeouts); a cheap format reward in-process."""
        acc = score_batch(_resolve(self.accuracy), responses, answers, timeout_s=timeout_s,
                          workers=workers, item_kwargs=item_kwargs, **kw)
        fmt_fn = _resolve(self.format)
        if isinstance(fmt_fn, PooledReward) or hasattr(fmt_fn, "score_batch"):
            fmt = score_batch(fmt_fn, responses, answers, timeout_s=timeout_s, workers=workers,
                              item_kwargs=item_kwargs, **kw)
        else:
            extra = item_kwargs if item_kwargs is not None else [{}] * len(responses)
            fmt = [fmt_fn(r, a, **{**kw, **e}) for r, a, e in zip(responses, answers, extra)]
        return [self.combine(a, f) for a, f in zip(acc, fmt)]


def combined_reward(spec: Mapping[str, Any] | None = None, **overrides: Any) -> CombinedReward:
    """Build a ``CombinedReward`` from a config mapping (keys: accuracy, weights, format_gated,
    format); keyword arguments override spec entries. Unknown keys or names raise."""
    merged = {**(spec or {}), **overrides}
    unknown = set(merged) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown combined-reward key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    if "accuracy" not in merged:
        raise ValueError("a combined-reward spec needs an 'accuracy' reward")
    weights = {k: float(v) for k, v in (merged.get("weights") or {"accuracy": 1.0}).items()}
    return CombinedReward(merged["accuracy"], weights, bool(merged.get("format_gated", True)),
                          merged.get("format", "format"))


register_reward("math_format")(CombinedReward("math", {"accuracy": 0.8, "format": 0.2}, True))
register_reward("choice_format")(CombinedReward("choice", {"accuracy": 0.8, "format": 0.2}, True))
register_reward("exact_format")(CombinedReward("exact", {"accuracy": 0.8, "format": 0.2}, True))
