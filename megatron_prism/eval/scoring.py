"""Scoring of generated responses with the rule-based rewards a record names (no LLM judge).

A *scorer* takes the records of a benchmark and, for each, its k responses, and returns one score
per response. :class:`RewardScorer` is the default: it routes each record to the reward named by
``meta["reward"]`` in ``megatron_prism.rewards`` (``get_reward`` / ``score_batch``), passes the
keyword arguments that reward takes (``options`` for ``choice``, ``rel_tol`` / ``abs_tol`` for
``numeric``), and
takes the best score over ``[answer] + meta["alternatives"]`` when a benchmark accepts several
answers. Any other callable of the same shape can stand in (tests, judges added later).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from megatron_prism.data.records import Record, RecordError

#: (records, responses[i][j]) -> scores[i][j]
Scorer = Callable[[list[Record], list[list[str]]], list[list[float]]]


def reward_call(record: Record) -> tuple[str, dict[str, Any]]:
    """The reward name and its keyword arguments for ``record`` (from ``meta``)."""
    name = record.meta.get("reward")
    if not isinstance(name, str) or not name:
        raise RecordError(f"{record.origin or record.id}: no meta['reward'] naming how to score it")
    kwargs: dict[str, Any] = {}
    if name == "choice":
        options = record.meta.get("options")
        if not isinstance(options, list):
            raise RecordError(f"{record.origin or record.id}: a choice record needs meta['options']")
        kwargs["options"] = [str(o) for o in options]
    elif name == "numeric":
        for key in ("rel_tol", "abs_tol"):
            if record.meta.get(key) is not None:
                kwargs[key] = float(record.meta[key])
    return name, kwargs


def accepted_answers(record: Record) -> list[str]:
    """The ground truth and any alternatives the benchmark also accepts."""
    return [str(record.answer)] + [str(a) for a in record.meta.get("alternatives") or []]


class RewardScorer:
    """Scores with ``megatron_prism.rewards``: one ``score_batch`` call per reward name, with each
    item's keyword arguments (``item_kwargs``), in the rewards' worker pool under ``timeout_s``."""

    def __init__(self, *, timeout_s: float = 5.0, workers: int = 2) -> None:
        self.timeout_s = timeout_s
        self.workers = workers

    def __call__(self, records: list[Record], responses: list[list[str]]) -> list[list[float]]:
        from megatron_prism.rewards import score_batch  # the rewards package, imported when used

        groups: dict[str, list[tuple[int, int, str, str, dict[str, Any]]]] = defaultdict(list)
        for i, (record, outs) in enumerate(zip(records, responses)):
            name, kwargs = reward_call(record)
            for j, text in enumerate(outs):
                for answer in accepted_answers(record):
                    groups[name].append((i, j, text, answer, kwargs))
        scores = [[0.0] * len(outs) for outs in responses]
        for name, entries in groups.items():
            results = score_batch(name, [e[2] for e in entries], [e[3] for e in entries],
                                  item_kwargs=[e[4] for e in entries], timeout_s=self.timeout_s,
                                  workers=self.workers)
            for (i, j, *_), result in zip(entries, results):
                scores[i][j] = max(scores[i][j], float(result))
        return scores


def scorer_from(fn: Callable[[str, Record], float]) -> Scorer:
    """A scorer from a per-response function ``fn(response, record) -> score``."""

    def score(records: list[Record], responses: list[list[str]]) -> list[list[float]]:
        return [[float(fn(text, rec)) for text in outs] for rec, outs in zip(records, responses)]

    return score
