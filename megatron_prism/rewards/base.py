"""Shared pieces of the reward functions: the result type, the registry, counters, tag parsing.

Every reward is a callable ``(response: str, answer: str, **kw) -> RewardResult`` registered in
``REWARDS`` under a name a config can pick. Rewards accept and ignore keyword arguments they do
not know, so a trainer can pass the same per-sample extras (``options=``, ``rel_tol=``...) to
whichever reward a config selects.

Responses have PRISM's form ``<caption>…</caption><think>…</think><answer>…</answer>``. The
accuracy rewards read the *last well-formed* ``<answer>…</answer>`` block (one whose content holds
no other answer tag): ``<answer>1</answer><answer>2</answer>`` is read as ``2`` and
``<answer><answer>1</answer></answer>`` as ``1``. Whether the layout itself is right is the
``format`` reward's business, and a format-gated combination (``math_format``) scores such
responses 0 anyway. A response with no answer block scores 0 with ``extracted=None``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from megatron_prism.registry import Registry


@dataclass(frozen=True)
class RewardResult:
    """One scored response. ``float(result)`` is the score.

    extracted  the text the reward compared with the ground truth (None: nothing to compare)
    format_ok  whether the PRISM layout is right (None where the reward did not check it)
    timed_out  verification ran past its budget and was killed (the score is then 0)
    error      why the reward could not score (bad ground truth, worker crash...); score 0
    details    component scores of combined rewards, e.g. ``{"accuracy": 1.0, "format": 1.0}``
    """

    score: float
    extracted: str | None = None
    format_ok: bool | None = None
    timed_out: bool = False
    error: str | None = None
    details: dict[str, float] = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.score)


class RewardFn(Protocol):
    def __call__(self, response: str, answer: str, **kw: Any) -> RewardResult: ...


REWARDS: Registry[RewardFn] = Registry("reward")


def register_reward(name: str) -> Callable[[Any], Any]:
    """Decorator registering a reward under ``name`` (``@register_reward("math")``)."""
    return REWARDS.register(name)


def lookup_reward(name: str) -> RewardFn:
    """The reward registered as ``name``; an unknown name raises ``UnknownNameError`` naming the
    nearest registered one. (Spec mappings are resolved one layer up, in ``rewards.resolve``, so
    that this module imports nothing of the package's rewards.)"""
    return REWARDS.get(name)


class RewardStats:
    """Thread-safe counters of verifications run in reward worker processes.

    calls     items sent to a worker (``score_batch`` items and pooled per-call rewards such as
              ``math``; the cheap in-process per-call rewards are not counted)
    timeouts  items killed for running past their budget
    errors    items whose reward raised, could not be pickled back, or whose worker died
    restarts  worker processes replaced (after a timeout or a crash)
    """

    FIELDS = ("calls", "timeouts", "errors", "restarts")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> dict[str, int]:
        """Zero the counters and return what they held (read-and-reset for per-step logging)."""
        with self._lock:
            old, self._counts = self._counts, dict.fromkeys(self.FIELDS, 0)
            return old

    def __getattr__(self, name: str) -> int:
        if name in RewardStats.FIELDS:
            return self.snapshot()[name]
        raise AttributeError(name)


STATS = RewardStats()


def reward_stats() -> dict[str, int]:
    """The module-level counters (calls, timeouts, errors, restarts) as a dict."""
    return STATS.snapshot()


def reset_reward_stats() -> dict[str, int]:
    """Zero the module-level counters; returns their previous values."""
    return STATS.reset()


# ----------------------------------------------------------------------------- text helpers

TAGS = ("caption", "think", "answer")
_ANSWER_RE = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.DOTALL)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_answer_block(response: str) -> str | None:
    """Content of the last well-formed ``<answer>…</answer>`` block, stripped; None if none."""
    last = None
    for match in _ANSWER_RE.finditer(response):
        last = match
    return None if last is None else last.group(1).strip()


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (braces balanced) in ``text``; None if there is none."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def answer_text(response: str, require_tags: bool = True) -> str | None:
    """The text an accuracy reward should judge.

    The last answer block; if there is none, None when ``require_tags`` (the default, as in
    training), else whatever follows the last ``</think>`` (or the whole response) — a lenient
    mode for scoring baselines that do not emit PRISM's tags.
    """
    block = extract_answer_block(response)
    if block is not None or require_tags:
        return block
    tail = response.rsplit("</think>", 1)[-1]
    tail = re.sub(r"</?(?:caption|think|answer)>", " ", tail).strip()
    return tail or None
