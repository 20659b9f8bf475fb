"""The cheap rewards: ``format``, ``choice``, ``numeric``, ``yesno``.

They are plain regex/float code (nothing is ``eval``ed and nothing can hang on long input), so
their per-call form runs in-process; ``score_batch`` still runs them in the worker pool like any
other reward. All accept and ignore unknown keyword arguments.

format: 1.0 iff the response is exactly ``<caption>C</caption><think>T</think><answer>A</answer>``
    — each tag exactly once, in that order, C/T/A non-empty after stripping, and only whitespace
    before, between and after the blocks. Trailing end-of-turn tokens (``<|im_end|>``,
    ``<|endoftext|>``, see ``END_TOKENS``) are ignored, since whether they survive decoding
    depends on the caller; any other trailing text fails the format.
choice: the gold is a letter (``B``, ``(b)``) or an option's text; options come per item as
    ``options=[...]`` (letters A, B, … in order; ``"A. text"`` labels are stripped) or
    ``options={"A": ...}``. Read as letters: ``B``, ``(B)``, ``B.``, ``B) 42``, ``The answer is B``,
    ``Option: B``, ``\\boxed{B}``; otherwise the answer's text must equal an option's (or, without
    options, the gold's) text, case- and whitespace-insensitively. A stated letter wins over text.
numeric: the first number of the answer (last ``\\boxed{}`` if any): commas as thousands
    separators, trailing units, ``%``, ``1e-3``, ``3 \\times 10^{5}``, ``a/b``, ``\\frac{a}{b}``.
    Correct iff ``|pred - gold| <= max(rel_tol * |gold|, abs_tol)``; a percentage on either side
    may also be read as a fraction (``50%`` matches ``50`` and ``0.5``).
yesno: yes/true vs no/false (case-insensitive), from the first word, else from the only polarity
    that occurs; a hedge that contains both scores 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_prism.rewards.base import TAGS, RewardResult, answer_text, last_boxed, register_reward

END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "</s>")
_LAYOUT_RE = re.compile(
    r"\s*<caption>(.*?)</caption>\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def check_format(response: str) -> bool:
    """Whether ``response`` has PRISM's layout (see the module docstring for the exact rule)."""
    text = response.rstrip()
    stripped = True
    while stripped:
        stripped = False
        for token in END_TOKENS:
            if text.endswith(token):
                text, stripped = text[: -len(token)].rstrip(), True
    for tag in TAGS:
        if text.count(f"<{tag}>") != 1 or text.count(f"</{tag}>") != 1:
            return False
    match = _LAYOUT_RE.fullmatch(text)
    return match is not None and all(group.strip() for group in match.groups())


@register_reward("format")
def format_reward(response: str, answer: str = "", **_: Any) -> RewardResult:
    """1.0 iff the caption→think→answer layout is exactly right (``answer`` is ignored)."""
    ok = check_format(response)
    return RewardResult(1.0 if ok else 0.0, extracted=None, format_ok=ok)


# ---------------------------------------------------------------------------- choice

_LETTER_ONLY = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:)]?")
_LETTER_LEAD = re.compile(r"[(\[]?([A-Z])(?:[)\]][.:]?|[.:])\s+\S.*", re.DOTALL)
_LETTER_PHRASE = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*(?i:option\s*)?[(\[]?([A-Z])[)\]]?(?![A-Za-z0-9])")
_LABEL_RE = re.compile(r"^[(\[]?[A-Z][)\].:]\s*")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _norm(text: str) -> str:
    text = _TEXT_WRAP_RE.sub(r"\1", text).replace("$", "")
    text = " ".join(text.split()).casefold()
    return text.strip(" .\"'`")


def _options_map(options: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): _norm(str(v)) for k, v in options.items()}
    return {chr(ord("A") + i): _norm(_LABEL_RE.sub("", str(opt).strip())) for i, opt in enumerate(options)}


def _stated_letter(text: str) -> str | None:
    text = _TEXT_WRAP_RE.sub(r"\1", text).replace("$", "").strip()
    if m := _LETTER_ONLY.fullmatch(text):
        return m.group(1).upper()
    if m := _LETTER_LEAD.fullmatch(text):
        return m.group(1)
    phrases = _LETTER_PHRASE.findall(text)
    return phrases[-1] if phrases else None


@register_reward("choice")
def choice_reward(response: str, answer: str, *,
                  options: Sequence[str] | Mapping[str, str] | None = None,
                  require_tags: bool = True, **_: Any) -> RewardResult:
    """Multiple-choice accuracy (see the module docstring for what is read as a choice)."""
    pred = answer_text(response, require_tags)
    if pred is None:
        return RewardResult(0.0, extracted=None)
    boxed = last_boxed(pred)
    if boxed is not None:
        pred = boxed
    opts = _options_map(options)
    gold = answer.strip()
    gold_letter = m.group(1).upper() if (m := _LETTER_ONLY.fullmatch(gold)) else None
    if gold_letter is None:
        gold_letter = next((k for k, v in opts.items() if v == _norm(gold)), None)
    gold_text = opts.get(gold_letter) if gold_letter else _norm(gold)
    if gold_letter is None and not gold_text:
        return RewardResult(0.0, extracted=pred, error=f"unusable ground truth {answer!r}")

    letter = _stated_letter(pred)
    if letter is None:
        letter = next((k for k, v in opts.items() if v == _norm(pred)), None)
    if letter is not None and gold_letter is not None:
        ok = letter == gold_letter
    elif letter is not None:  # a letter, but the gold is text we cannot map to a letter
        ok = False
    else:
        ok = gold_text is not None and _norm(pred) == gold_text
    return RewardResult(1.0 if ok else 0.0, extracted=letter or pred)


# ---------------------------------------------------------------------------- numeric

_NUM = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.])({_NUM})(?:\s*/\s*({_NUM}))?(\s*%)?")
_POW10_RE = re.compile(r"\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?")
_FRAC_RE = re.compile(r"\\d?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")


def parse_number(text: str) -> tuple[float, bool] | None:
    """``(value, is_percent)`` of the first number in ``text``, or None."""
    text = text.replace("−", "-").replace("\\%", "%").replace("{,}", ",").replace("\\,", "")
    text = _FRAC_RE.sub(r"\1/\2", text)
    text = _POW10_RE.sub(r"e\1", text)
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    try:
        value = float(match.group(1).replace(",", ""))
        if match.group(2):
            value /= float(match.group(2).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return (value, bool(match.group(3))) if math.isfinite(value) else None


def _candidates(parsed: tuple[float, bool]) -> list[float]:
    value, percent = parsed
    return [value, value / 100.0] if percent else [value]


@register_reward("numeric")
def numeric_reward(response: str, answer: str, *, rel_tol: float = 1e-2, abs_tol: float = 1e-6,
                   require_tags: bool = True, **_: Any) -> RewardResult:
    """Numeric accuracy with relative tolerance ``rel_tol`` and absolute floor ``abs_tol``."""
    pred_text = answer_text(response, require_tags)
    if pred_text is None:
        return RewardResult(0.0, extracted=None)
    boxed = last_boxed(pred_text)
    if boxed is not None:
        pred_text = boxed
    gold = parse_number(answer)
    if gold is None:
        return RewardResult(0.0, extracted=pred_text, error=f"unparseable ground truth {answer!r}")
    pred = parse_number(pred_text)
    if pred is None:
        return RewardResult(0.0, extracted=pred_text)
    ok = any(abs(p - g) <= max(rel_tol * abs(g), abs_tol)
             for p in _candidates(pred) for g in _candidates(gold))
    return RewardResult(1.0 if ok else 0.0, extracted=pred_text)


# ---------------------------------------------------------------------------- yes/no

_YES = frozenset({"yes", "true"})
_NO = frozenset({"no", "false"})


def parse_yesno(text: str) -> bool | None:
    """True for yes, False for no, None when absent or ambiguous."""
    words = re.findall(r"[a-z]+", _TEXT_WRAP_RE.sub(r"\1", text).casefold())
    if not words:
        return None
    if words[0] in _YES or words[0] in _NO:
        return words[0] in _YES
    has_yes, has_no = any(w in _YES for w in words), any(w in _NO for w in words)
    return has_yes if has_yes != has_no else None


@register_reward("yesno")
def yesno_reward(response: str, answer: str, *, require_tags: bool = True, **_: Any) -> RewardResult:
    """Yes/no accuracy (HallusionBench style)."""
    pred_text = answer_text(response, require_tags)
    if pred_text is None:
        return RewardResult(0.0, extracted=None)
    gold = parse_yesno(answer)
    if gold is None:
        return RewardResult(0.0, extracted=pred_text, error=f"unparseable ground truth {answer!r}")
    pred = parse_yesno(last_boxed(pred_text) or pred_text)
    return RewardResult(1.0 if pred is gold else 0.0, extracted=pred_text)


@register_reward("exact")
def exact_reward(response: str, answer: str, *, require_tags: bool = True, **_: Any) -> RewardResult:
    """Exact match after normalisation (case, surrounding space and punctuation): for tasks whose
    answers are short canonical strings, such as the embedded synthetic task (numbers, colours)."""
    pred_text = answer_text(response, require_tags)
    if pred_text is None:
        return RewardResult(0.0, extracted=None)
    return RewardResult(1.0 if _norm(pred_text).strip(" .") == _norm(answer).strip(" .") else 0.0, extracted=pred_text)
