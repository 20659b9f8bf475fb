"""Mechanism readouts of the embedded task: did a response's perception and reasoning hold up?

PRISM's claim is that the game corrects perception (the caption) and reasoning toward the teacher.
Final accuracy mixes both; these two rates, over responses that have all three parts, separate them:

* **slip rate**: the ``<answer>`` differs from the result the response's own ``<think>`` reached
  (the teacher's slips of the SFT split are exactly this: right caption and reasoning, wrong
  answer). The think's result is read from its last sentence, where every template states it
  ("So there are 3.", "2 - 2 = 0.", "The most is red with 3.": :func:`think_result`).
* **caption error rate**: the ``<caption>`` is not the faithful caption of the record's scene (its
  ``meta.scene``) in the task's template (:func:`questions.caption`): a response that imitates the
  template must reproduce it exactly. The SFT split's caption slips are exactly such errors.

They read the task's own templates, so they live beside them: a new template needs its readout
here. Records without a synthetic scene (your data) get no readout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from megatron_prism.data.synth.questions import Question, caption

_PARTS = re.compile(r"<caption>(.*?)</caption>\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.S)
_TOKEN = re.compile(r"-?\w+|=")


def parts(response: str) -> tuple[str, str, str] | None:
    """(caption, think, answer) of a ``<caption><think><answer>`` response, stripped; None when a
    part is missing."""
    m = _PARTS.search(response)
    return None if m is None else (m.group(1).strip(), m.group(2).strip(), m.group(3).strip())


def think_result(think: str) -> str | None:
    """The result the think states: in its last sentence, the word after the last ``=``, ``is`` or
    ``are`` ("2 - 2 = 0.", "So there are 3.", "The most is red with 3."), else the last word."""
    sentences = [s for s in re.split(r"(?<=\.)\s+", think.strip()) if s]
    words = _TOKEN.findall(sentences[-1].lower()) if sentences else []
    marks = [i for i, w in enumerate(words) if w in ("=", "is", "are") and i + 1 < len(words)]
    return words[marks[-1] + 1] if marks else (words[-1] if words else None)


def is_slip(think: str, answer: str) -> bool:
    """The answer is not the result the think reached (module docstring)."""
    return " ".join(_TOKEN.findall(answer.lower())) != think_result(think)


def faithful_caption(meta: dict[str, Any], answer: str) -> str:
    """The caption the task's template writes for this record's (true) scene."""
    q = Question(qtype=meta["qtype"], params=dict(meta.get("params", {})), answer=answer)
    return caption(meta["scene"], q)


def mechanism_rates(responses: Sequence[str], records: Sequence[Any], prefix: str = "eval/") -> dict[str, float]:
    """``slip_rate`` and ``caption_error_rate`` over the responses that have all three parts, with
    ``readout_responses`` (how many that is); {} when no record carries a synthetic scene."""
    slips = errors = counted = 0
    with_scene = 0
    for response, rec in zip(responses, records):
        meta = getattr(rec, "meta", None) or {}
        if "scene" not in meta or "qtype" not in meta:
            continue
        with_scene += 1
        got = parts(response)
        if got is None:
            continue
        seen, think, answer = got
        counted += 1
        slips += is_slip(think, answer)
        errors += seen != faithful_caption(meta, rec.answer or "")
    if not with_scene:
        return {}
    rate = (lambda k: k / counted) if counted else (lambda k: float("nan"))
    return {f"{prefix}slip_rate": rate(slips), f"{prefix}caption_error_rate": rate(errors),
            f"{prefix}readout_responses": float(counted)}
