"""Verifiable rewards for RLVR on PRISM responses (``<caption>…</caption><think>…</think><answer>…</answer>``).

Registered rewards (``get_reward(name)``, each ``(response, answer, **kw) -> RewardResult``):

math           math-verify equivalence of the answer block, in a killable worker with a timeout
choice         multiple-choice letter / option text
numeric        number with relative tolerance (``rel_tol``, default 1e-2)
yesno          yes/no (true/false) answers, e.g. HallusionBench
format         1 iff the caption/think/answer layout is exactly right
math_format    format-gated 0.8 * math + 0.2 * format
choice_format  format-gated 0.8 * choice + 0.2 * format

``combined_reward(spec)`` builds other weighted combinations; ``score_batch`` scores a batch in
parallel worker processes with per-item timeouts; ``STATS`` / ``reward_stats()`` /
``reset_reward_stats()`` count calls, timeouts and errors for the trainer's logs.
"""

from megatron_prism.rewards.base import (
    REWARDS,
    STATS,
    RewardResult,
    RewardStats,
    answer_text,
    extract_answer_block,
    lookup_reward,
    register_reward,
    reset_reward_stats,
    reward_stats,
)
from megatron_prism.rewards.pool import PooledReward, RewardPool, get_pool, shutdown_pool
from megatron_prism.rewards.math_reward import math_verify_reward
from megatron_prism.rewards.simple import choice_reward, format_reward, numeric_reward, yesno_reward
from megatron_prism.rewards.combined import CombinedReward, combined_reward
from megatron_prism.rewards.resolve import get_reward, score_batch

__all__ = [
    "REWARDS", "STATS", "CombinedReward", "PooledReward", "RewardPool", "RewardResult", "RewardStats",
    "answer_text", "choice_reward", "combined_reward", "extract_answer_block", "format_reward",
    "get_pool", "get_reward", "lookup_reward", "math_verify_reward", "numeric_reward", "register_reward",
    "reset_reward_stats", "reward_stats", "score_batch", "shutdown_pool", "yesno_reward",
]
