"""The worker pool: timeouts that really kill, counters, recovery, parallelism, clean shutdown.

``sleepy_reward`` is a test-only reward registered in a registry of its own; it reaches the
workers through the same pickling/timeout machinery as the real rewards.
"""

from __future__ import annotations

import os
import time

import pytest

from megatron_prism.registry import Registry
from megatron_prism.rewards import (
    STATS, RewardPool, RewardResult, get_pool, get_reward, reset_reward_stats, reward_stats,
    score_batch, shutdown_pool,
)

TEST_REWARDS: Registry = Registry("test reward")
PRISM = "<caption>c</caption><think>t</think><answer>{}</answer>"


@TEST_REWARDS.register("sleepy")
def sleepy_reward(response: str, answer: str, **_: object) -> RewardResult:
    start = time.time()  # wall clock: comparable across the worker processes
    time.sleep(float(answer))
    return RewardResult(1.0, extracted=response, details={"start": start, "end": time.time(), "pid": float(os.getpid())})


def half_reward(response: str, answer: str, **_: object) -> float:
    return 0.5


def crashing_reward(response: str, answer: str, **_: object) -> RewardResult:
    if response == "exit":
        os._exit(3)
    raise ValueError("boom")


@pytest.fixture(scope="module", autouse=True)
def _warm_pool():
    get_pool(2).start()
    score_batch("math", [PRISM.format("1")] * 2, ["1"] * 2)  # workers up before timing anything
    yield
    shutdown_pool()


@pytest.mark.parametrize("expr", ["9^{9^{9^{9^{9}}}}", "(10^{10})!"])
def test_pathological_math_times_out_and_pool_recovers(expr: str) -> None:
    before = reward_stats()
    start = time.monotonic()
    result = get_reward("math")(PRISM.format(expr), "1", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.score == 0.0 and result.timed_out
    assert elapsed < 1.0 + 10.0  # killed at its budget (the expression itself would never finish)
    after = reward_stats()
    assert after["timeouts"] == before["timeouts"] + 1
    assert after["restarts"] == before["restarts"] + 1
    assert get_reward("math")(PRISM.format("\\frac{1}{2}"), "0.5").score == 1.0  # pool still works


def test_batch_timeouts_are_per_item_and_parallel() -> None:
    # Parallelism is read from when and where each item ran, not from a wall-clock bound, so a
    # loaded machine (CI shares its 2 cores) cannot fail it.
    sleepy = TEST_REWARDS.get("sleepy")
    got = score_batch(sleepy, ["a", "b", "c", "d"], ["0.5"] * 4, timeout_s=10.0, workers=2)
    done = [r.details for r in got]
    overlapping = [(x, y) for i, x in enumerate(done) for y in done[i + 1:]
                   if x["pid"] != y["pid"] and x["start"] < y["end"] and y["start"] < x["end"]]
    assert overlapping, f"no two items ran at the same time in different workers: {done}"

    reset_reward_stats()
    start = time.monotonic()
    got = score_batch(sleepy, ["a", "b", "c", "d", "e"], ["0.3", "0.3", "30", "0.3", "0.3"],
                      timeout_s=3.0, workers=2)
    assert [r.timed_out for r in got] == [False, False, True, False, False]
    assert [r.score for r in got] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert [r.extracted for r in got] == ["a", "b", None, "d", "e"]  # results stay in order
    assert time.monotonic() - start < 30.0  # the hanging item was killed, not waited for
    assert STATS.timeouts == 1 and STATS.calls == 5 and STATS.errors == 0
    assert reset_reward_stats()["timeouts"] == 1 and reward_stats()["timeouts"] == 0


def test_mixed_batch_of_math_with_a_hang() -> None:
    responses = [PRISM.format(x) for x in ["1/2", "10^{10^{10^{10}}}", "\\sqrt{8}", "3"]]
    got = score_batch("math", responses, ["0.5", "1", "2\\sqrt{2}", "4"], timeout_s=1.0)
    assert [r.score for r in got] == [1.0, 0.0, 1.0, 0.0]
    assert [r.timed_out for r in got] == [False, True, False, False]


def test_errors_and_crashes_score_zero_and_are_counted() -> None:
    before = reward_stats()
    got = score_batch(crashing_reward, ["raise", "exit", "raise"], ["", "", ""], timeout_s=5.0)
    assert all(r.score == 0.0 and not r.timed_out for r in got)
    assert "ValueError: boom" in got[0].error and "died" in got[1].error
    assert reward_stats()["errors"] == before["errors"] + 3
    assert score_batch("math", [PRISM.format("2")], ["2"])[0].score == 1.0


def test_unpicklable_reward_is_rejected_clearly() -> None:
    with pytest.raises(TypeError, match="picklable"):
        score_batch(lambda r, a: 1.0, ["x"], ["y"])


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        score_batch("numeric", ["<answer>1</answer>"], ["1", "2"])


def test_float_returning_callable_and_cheap_rewards_in_pool() -> None:
    got = score_batch("numeric", [PRISM.format("3.14"), PRISM.format("3")], ["3.14159", "4"])
    assert [r.score for r in got] == [1.0, 0.0]
    assert score_batch(half_reward, ["x"], ["y"]) == [RewardResult(0.5)]


def _exists(pid: int) -> bool:
    """Whether a process (zombies included) still has this pid: killed workers must be reaped."""
    return os.path.exists(f"/proc/{pid}")


def test_private_pool_kills_hung_workers_and_leaves_no_zombies() -> None:
    pool = RewardPool(1)
    try:
        [(status, first)] = pool.run([(sleepy_reward, ("x", "0"), {})], timeout_s=5.0)
        assert status == "ok" and (first.score, first.extracted) == (1.0, "x")
        hung = pool.worker_pids()
        assert pool.run([(sleepy_reward, ("x", "30"), {})], timeout_s=0.5) == [("timeout", None)]
        assert not any(map(_exists, hung))  # killed and reaped
        assert pool.run([(sleepy_reward, ("y", "0"), {})], timeout_s=5.0)[0][0] == "ok"
        replacement = pool.worker_pids()
        assert replacement and replacement != hung
    finally:
        pool.shutdown()
    assert not any(map(_exists, replacement))
    assert pool.worker_pids() == []
