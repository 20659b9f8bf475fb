"""The cheap rewards: format, choice, numeric, yesno (in-process per call)."""

from __future__ import annotations

import pytest

from megatron_prism.rewards import get_reward

OK = "<caption>A bar chart of sales.</caption><think>The tallest bar is B.</think><answer>{}</answer>"


def wrap(answer: str) -> str:
    return OK.format(answer)


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("response, ok", [
    (wrap("B"), True),
    ("  <caption>c</caption>\n<think>t</think>\n<answer>a</answer>\n", True),
    (wrap("B") + "<|im_end|>", True),                                        # end token stripped
    (wrap("B") + "<|im_end|><|endoftext|>", True),
    ("<caption>c</caption><think>t</think>", False),                         # missing answer
    ("<think>t</think><answer>a</answer>", False),                           # missing caption
    ("<think>t</think><caption>c</caption><answer>a</answer>", False),       # wrong order
    ("<caption>  </caption><think>t</think><answer>a</answer>", False),      # empty caption
    ("<caption>c</caption><think>t</think><answer>\n</answer>", False),      # empty answer
    ("<caption>c</caption><think>t</think><answer>1</answer><answer>2</answer>", False),
    ("<caption>c</caption><caption>c</caption><think>t</think><answer>a</answer>", False),
    ("<caption>c</caption><think>t</think><answer><answer>a</answer></answer>", False),
    ("Sure! <caption>c</caption><think>t</think><answer>a</answer>", False),  # text before
    ("<caption>c</caption>so<think>t</think><answer>a</answer>", False),      # text between
    (wrap("B") + " Hope this helps.", False),                                # text after
    ("<caption>c</caption><think>t</think><answer>a", False),                # unclosed
    ("<Caption>c</Caption><think>t</think><answer>a</answer>", False),       # tags are exact
])
def test_format(response: str, ok: bool) -> None:
    result = get_reward("format")(response, "ignored", options=["x"])
    assert result.score == (1.0 if ok else 0.0)
    assert result.format_ok is ok


# ----------------------------------------------------------------------------- choice

OPTIONS = ["12", "42", "7 apples", "None of the above"]


@pytest.mark.parametrize("pred, gold, score", [
    ("B", "B", 1), ("(B)", "B", 1), ("B.", "B", 1), ("B) 42", "B", 1), ("b", "B", 1),
    ("The answer is B", "B", 1), ("The answer is (B).", "B", 1), ("Answer: B", "B", 1),
    ("\\boxed{B}", "B", 1), ("\\text{B}", "(B)", 1), ("B. 42", "b", 1),
    ("42", "B", 1), ("  7 APPLES ", "C", 1), ("7 apples", "7 Apples", 1),
    ("A", "B", 0), ("C) 42", "B", 0), ("13", "B", 0), ("A or B", "B", 0), ("", "B", 0),
    ("The answer is C", "B", 0), ("none of the above.", "D", 1),
])
def test_choice_with_options(pred: str, gold: str, score: int) -> None:
    assert get_reward("choice")(wrap(pred), gold, options=OPTIONS).score == score


def test_choice_options_forms() -> None:
    choice = get_reward("choice")
    labelled = ["A. red", "B. green", "(C) blue"]
    assert choice(wrap("blue"), "C", options=labelled).score == 1.0
    assert choice(wrap("green"), "green", options=labelled).score == 1.0      # gold as text
    assert choice(wrap("B"), "green", options=labelled).score == 1.0
    assert choice(wrap("B"), "green", options={"a": "red", "b": "green"}).score == 1.0
    assert choice(wrap("The answer is B"), "green").score == 0.0             # no way to map
    assert choice(wrap("Green."), "green").score == 1.0                      # text vs text
    assert choice(wrap("B"), "B").score == 1.0                               # no options needed
    assert choice("B", "B").extracted is None                                # no answer tag


# ----------------------------------------------------------------------------- numeric

@pytest.mark.parametrize("pred, gold, kw, score", [
    ("42", "42", {}, 1), ("42.3", "42", {}, 1), ("43", "42", {}, 0), ("42.4", "42", {}, 1),
    ("42.5", "42", {}, 0), ("43", "42", {"rel_tol": 0.05}, 1),
    ("1,234,567", "1234567", {}, 1), ("12,345.6 m", "12345.6", {}, 1), ("3.5 kg", "3.5", {}, 1),
    ("The distance is 120 km.", "120", {}, 1), ("x = -3", "-3", {}, 1), ("3", "-3", {}, 0),
    ("50%", "0.5", {}, 1), ("50\\%", "50", {}, 1), ("0.5", "50%", {}, 1), ("5%", "0.5", {}, 0),
    ("1.5e3", "1500", {}, 1), ("3 \\times 10^{5}", "300000", {}, 1), ("2.0E-4", "0.0002", {}, 1),
    ("3/4", "0.75", {}, 1), ("\\frac{3}{4}", "0.75", {}, 1), ("\\boxed{8}", "8", {}, 1),
    ("0", "0", {}, 1), ("0.0000001", "0", {}, 1), ("0.001", "0", {}, 0),
    ("0.001", "0", {"abs_tol": 0.01}, 1), ("about seven", "7", {}, 0), ("1/0", "1", {}, 0),
])
def test_numeric(pred: str, gold: str, kw: dict, score: int) -> None:
    assert get_reward("numeric")(wrap(pred), gold, **kw).score == score


def test_numeric_bad_ground_truth_is_reported() -> None:
    result = get_reward("numeric")(wrap("3"), "n/a")
    assert result.score == 0.0 and result.error is not None


# ----------------------------------------------------------------------------- yes/no

@pytest.mark.parametrize("pred, gold, score", [
    ("Yes", "yes", 1), ("yes.", "Yes", 1), ("No", "no", 1), ("True", "yes", 1), ("false", "No", 1),
    ("No, the bar is not the tallest.", "no", 1), ("Yes, it is.", "no", 0),
    ("The answer is yes", "yes", 1), ("\\boxed{No}", "no", 1), ("\\text{yes}", "yes", 1),
    ("yes or no", "yes", 1),  # first word decides
    ("It could be yes or no", "yes", 0), ("maybe", "no", 0), ("", "yes", 0), ("Not sure", "no", 0),
])
def test_yesno(pred: str, gold: str, score: int) -> None:
    assert get_reward("yesno")(wrap(pred), gold).score == score


def test_yesno_requires_answer_block() -> None:
    assert get_reward("yesno")("Yes", "yes").score == 0.0
    assert get_reward("yesno")("Yes", "yes", require_tags=False).score == 1.0


def test_exact_and_exact_format():
    from megatron_prism.rewards import get_reward

    good = "<caption>two red circles</caption><think>1, 2.</think><answer> Red. </answer>"
    assert float(get_reward("exact")(good, "red")) == 1.0
    assert float(get_reward("exact")(good, "blue")) == 0.0
    assert float(get_reward("exact")("red", "red")) == 0.0  # no answer tag
    assert float(get_reward("exact_format")(good, "red")) == 1.0
    assert float(get_reward("exact_format")(good, "3")) == pytest.approx(0.2)
    assert float(get_reward("exact_format")("<answer>red</answer>", "red")) == 0.0  # format gate
