"""Combined rewards (weights, format gating), the registry, and RewardResult."""

from __future__ import annotations

import pytest

from megatron_prism.registry import UnknownNameError
from megatron_prism.rewards import (
    REWARDS, CombinedReward, RewardResult, combined_reward, get_reward, score_batch, shutdown_pool,
)

GOOD = "<caption>A triangle.</caption><think>Half of one.</think><answer>{}</answer>"
BAD = "I think the answer is: <answer>{}</answer>"


@pytest.fixture(scope="module", autouse=True)
def _pool():
    yield
    shutdown_pool()


def test_registered_names() -> None:
    assert {"math", "choice", "numeric", "yesno", "format", "math_format", "choice_format"} <= set(REWARDS.names())


def test_unknown_name_suggests_nearest() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'math_format'"):
        get_reward("math_fromat")


def test_result_is_float_like() -> None:
    assert float(RewardResult(0.25)) == 0.25
    assert sum(map(float, [RewardResult(1.0), RewardResult(0.5)])) == 1.5


@pytest.mark.parametrize("response, gold, score, accuracy", [
    (GOOD.format("\\frac{1}{2}"), "0.5", 1.0, 1.0),   # right, well formatted
    (GOOD.format("0.4"), "0.5", 0.2, 0.0),            # wrong, well formatted: format part only
    (BAD.format("0.5"), "0.5", 0.0, 1.0),             # right, badly formatted: gated to 0
    (BAD.format("0.4"), "0.5", 0.0, 0.0),
])
def test_math_format_gated(response: str, gold: str, score: float, accuracy: float) -> None:
    result = get_reward("math_format")(response, gold)
    assert result.score == pytest.approx(score)
    assert result.format_ok is response.startswith("<caption>")
    assert result.details == {"accuracy": accuracy, "format": 1.0 if result.format_ok else 0.0}


def test_choice_format() -> None:
    reward = get_reward("choice_format")
    assert reward(GOOD.format("(C)"), "C", options=["1", "2", "3"]).score == pytest.approx(1.0)
    assert reward(GOOD.format("3"), "C", options=["1", "2", "3"]).score == pytest.approx(1.0)
    assert reward(GOOD.format("A"), "C").score == pytest.approx(0.2)
    assert reward(BAD.format("C"), "C").score == 0.0


def test_spec_weights_and_ungated() -> None:
    ungated = combined_reward({"accuracy": "math", "weights": {"accuracy": 0.7, "format": 0.3},
                               "format_gated": False})
    assert ungated(BAD.format("0.5"), "0.5").score == pytest.approx(0.7)
    assert ungated(GOOD.format("0.5"), "0.5").score == pytest.approx(1.0)
    accuracy_only = get_reward({"accuracy": "numeric"})          # weights default to accuracy 1.0
    assert accuracy_only(GOOD.format("41.9"), "42").score == 1.0
    assert accuracy_only(BAD.format("42"), "42").score == 0.0    # gating defaults to on
    tolerant = combined_reward({"accuracy": "numeric"}, format_gated=False)
    assert tolerant(BAD.format("42.3"), "42", rel_tol=1e-3).score == 0.0  # kwargs reach accuracy
    assert tolerant(BAD.format("42.3"), "42").score == 1.0


def test_custom_accuracy_callable() -> None:
    reward = CombinedReward(lambda response, answer, **kw: RewardResult(0.5), {"accuracy": 1.0, "format": 1.0})
    assert reward(GOOD.format("x"), "y").score == pytest.approx(1.5)


def test_bad_specs_raise() -> None:
    with pytest.raises(ValueError, match="accuracy"):
        combined_reward({"weights": {"format": 1.0}})
    with pytest.raises(ValueError, match="unknown reward weight"):
        combined_reward({"accuracy": "math", "weights": {"acc": 1.0}})
    with pytest.raises(ValueError, match="unknown combined-reward key"):
        combined_reward({"accuracy": "math", "gated": True})
    with pytest.raises(UnknownNameError):
        combined_reward({"accuracy": "maths"})


def test_batch_matches_per_call() -> None:
    responses = [GOOD.format("1/2"), GOOD.format("3"), BAD.format("1/2"), "no tags at all", GOOD.format("")]
    answers = ["0.5", "0.5", "0.5", "0.5", "0.5"]
    batch = score_batch("math_format", responses, answers, timeout_s=5.0, workers=2)
    single = [get_reward("math_format")(r, a) for r, a in zip(responses, answers)]
    assert [r.score for r in batch] == pytest.approx([r.score for r in single])
    assert [r.score for r in batch] == pytest.approx([1.0, 0.2, 0.0, 0.0, 0.0])


def test_batch_item_kwargs() -> None:
    responses = [GOOD.format("B"), GOOD.format("blue")]
    options = [{"options": ["x", "y"]}, {"options": ["red", "green", "blue"]}]
    got = score_batch("choice_format", responses, ["B", "C"], item_kwargs=options)
    assert [r.score for r in got] == pytest.approx([1.0, 1.0])
