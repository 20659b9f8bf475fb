"""The ``math`` reward: equivalent forms, wrong answers, tag handling, and no eval of model text.

Every call goes through the worker pool (``math`` is a PooledReward), so these are also
end-to-end tests of the per-call path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_prism.rewards import get_reward, math_verify_reward, score_batch, shutdown_pool

PRISM = "<caption>A worksheet with one question.</caption><think>Compute it.</think><answer>{}</answer>"


@pytest.fixture(scope="module", autouse=True)
def _pool():
    yield
    shutdown_pool()


def math(pred: str, gold: str, **kw):
    return get_reward("math")(PRISM.format(pred), gold, **kw)


@pytest.mark.parametrize("pred, gold", [
    ("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "1/2"), ("\\dfrac12", "0.5"),
    ("$\\frac{1}{2}$", "0.5"), ("\\(\\frac{1}{2}\\)", "1/2"), ("The answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\sqrt{8}", "$2\\sqrt{2}$"), ("x=4", "4"), ("4", "x = 4"),
    ("50\\%", "0.5"), ("(x+1)^2", "x^2+2x+1"), ("\\frac{\\pi}{2}", "\\pi/2"), ("3.0", "3"),
    ("[1,2)", "[1, 2)"), ("\\{2, 1\\}", "\\{1,2\\}"), ("1,000", "1000"), ("1e-3", "0.001"),
    ("-7", "-7"), ("12 cm", "12"), ("The answer is 12.", "12"),
])
def test_equivalent_forms_score_one(pred: str, gold: str) -> None:
    result = math(pred, gold)
    assert result.score == 1.0, result
    assert float(result) == 1.0 and not result.timed_out and result.error is None


@pytest.mark.parametrize("pred, gold", [
    ("1/3", "0.5"), ("0.3333", "1/3"), ("(1,2]", "[1,2)"), ("2\\sqrt{3}", "\\sqrt{8}"),
    ("-4", "4"), ("x^2+1", "(x+1)^2"), ("five", "5"), ("", "5"),
])
def test_wrong_answers_score_zero(pred: str, gold: str) -> None:
    assert math(pred, gold).score == 0.0


def test_tag_handling() -> None:
    reward = get_reward("math")
    # No answer block: nothing is extracted, even if the right number is in the text.
    missing = reward("<caption>c</caption><think>it is 4</think> The answer is 4", "4")
    assert missing.score == 0.0 and missing.extracted is None
    assert reward("4", "4").score == 0.0
    # Unclosed tag is not an answer block.
    assert reward("<answer>4", "4").extracted is None
    # Repeated blocks: the last one is read (format rewards reject the response anyway).
    assert reward("<answer>1</answer><answer>2</answer>", "2").score == 1.0
    assert reward("<answer>1</answer><answer>2</answer>", "1").score == 0.0
    # Nested blocks: the innermost well-formed block is read.
    assert reward("<answer><answer>3</answer></answer>", "3").extracted == "3"
    # Lenient mode for tagless baselines.
    assert reward("<think>so</think> 4", "4", require_tags=False).score == 1.0
    # A boxed value inside the block wins over the surrounding text.
    assert reward("<answer>From 3 steps we get \\boxed{7}</answer>", "7").score == 1.0


def test_unparseable_ground_truth_is_an_error_not_a_pass() -> None:
    result = math("4", "")
    assert result.score == 0.0 and result.error is not None


def test_in_process_impl_matches() -> None:
    assert math_verify_reward(PRISM.format("\\dfrac{3}{4}"), "0.75").score == 1.0


def test_unknown_kwargs_are_ignored() -> None:
    assert math("4", "4", options=["A", "B"], something_else=1).score == 1.0


INJECTIONS = [
    "__import__('os').system('touch {p}')",
    "$__import__('os').system('touch {p}')$",
    "\\boxed{{__import__('os').system('touch {p}')}}",
    "eval(\"__import__('os').system('touch {p}')\")",
    "exec('import os; os.system(\"touch {p}\")')",
]


@pytest.mark.parametrize("reward", ["math", "numeric", "choice", "yesno", "math_format"])
def test_model_output_is_never_executed(tmp_path: Path, reward: str) -> None:
    target = tmp_path / "pwned"
    responses = [PRISM.format(t.format(p=target)) for t in INJECTIONS]
    fn = get_reward(reward)
    singles = [fn(r, "4") for r in responses]
    batch = score_batch(reward, responses, ["4"] * len(responses), timeout_s=30.0)  # generous: this test is about injection, not speed
    assert not target.exists()
    # math_format keeps its 0.2 for the (correct) layout; the accuracy part is 0 everywhere.
    expected = 0.2 if reward == "math_format" else 0.0
    assert [r.score for r in singles + batch] == pytest.approx([expected] * (2 * len(INJECTIONS)))
    assert not any(r.timed_out for r in singles + batch)
