"""The ``math`` reward: math-verify equivalence of the answer block and the ground truth.

The predicted answer is the last answer block (its last ``\\boxed{}`` when it has one). Both sides
are parsed with math-verify's *LaTeX* extractor only, wrapped in ``$…$`` when they carry no math
delimiters of their own (bare ``\\dfrac12`` or ``2\\sqrt{2}`` are otherwise not recognised, and a
bare ``1,2`` would read as the decimal 1.2). The LaTeX path goes through latex2sympy's ANTLR
grammar and builds sympy objects directly; math-verify's plain-expression extractor (which calls
sympy's ``parse_expr``, an ``eval`` underneath) is deliberately not used, and nothing here
``sympify``s or ``eval``s a model string. Forms accepted as equal are math-verify's: ``1/2``,
``0.5``, ``\\frac{1}{2}``, ``\\dfrac12``, ``50\\%`` vs ``0.5``, ``2\\sqrt{2}`` vs ``\\sqrt{8}``,
sets/intervals, and ``x=4`` vs ``4`` (math-verify compares the right-hand side of a single-variable
equation with a number).

Verification can hang on adversarial input (``9^{9^{9^{9^{9}}}}``), so ``math`` is a
``PooledReward``: each call runs ``math_verify_reward`` in a killable worker with a timeout.
math-verify's own SIGALRM timeouts are switched off there; the pool enforces the budget.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from megatron_prism.rewards.base import RewardResult, answer_text, last_boxed, register_reward
from megatron_prism.rewards.pool import PooledReward

_MATH_DELIMS = ("$", "\\(", "\\[", "\\boxed", "\\begin{equation")
_PREFIX_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*)?:?\s*", re.IGNORECASE)
_SCI_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[eE]([-+]?\d+)(?![\w.])")


def _latex_config() -> list[Any]:
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig()]


def prepare(text: str) -> str:
    """Turn an answer string into something math-verify's LaTeX extractor reads as intended."""
    text = _PREFIX_RE.sub("", text.strip())
    text = text.rstrip(". \n\t")
    text = _SCI_RE.sub(r"\1\\times 10^{\2}", text)  # 1e-3 would otherwise read as 1*e - 3
    if any(d in text for d in _MATH_DELIMS):
        return text
    return f"${text}$"


def parse_answer(text: str) -> list[Any]:
    """math-verify parse of ``text`` (LaTeX extraction only, no signal timeout). [] if nothing."""
    from math_verify import parse

    if not text.strip():
        return []
    return parse(prepare(text), extraction_config=_latex_config(), parsing_timeout=None)


def math_verify_reward(response: str, answer: str, *, require_tags: bool = True,
                       **_: Any) -> RewardResult:
    """In-process ``math`` reward (no timeout: call it through the pool, i.e. ``math``)."""
    from math_verify import verify

    pred_text = answer_text(response, require_tags)
    if pred_text is None:
        return RewardResult(0.0, extracted=None)
    boxed = last_boxed(pred_text)
    if boxed is not None:
        pred_text = boxed
    gold = parse_answer(answer)
    if not gold:
        return RewardResult(0.0, extracted=pred_text, error=f"unparseable ground truth {answer!r}")
    pred = parse_answer(pred_text)
    if not pred:
        return RewardResult(0.0, extracted=pred_text)
    ok = verify(gold, pred, timeout_seconds=None)
    return RewardResult(1.0 if ok else 0.0, extracted=pred_text)


def warm_up() -> None:
    """Import sympy/latex2sympy and build the ANTLR parser (worker start-up)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_verify_reward("<answer>\\frac{1}{2}</answer>", "0.5")


MATH = register_reward("math")(PooledReward(math_verify_reward, timeout_s=5.0))
