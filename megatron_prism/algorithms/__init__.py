"""The training maths of every stage, as small registered functions.

advantages  outcome advantage estimators (grpo, drgrpo, rloo, reinforce_plus_plus_baseline)
game_advantage  the ALIGN game's estimator prism_game (group-normalised discriminator part scores)
discriminator_loss  the discriminator's per-part Bradley-Terry loss (bradley_terry)
policy_loss one surrogate API for grpo/ppo, dapo, gspo, vanilla (Triton kernel or torch reference)
aggregation the four loss aggregation modes, split-invariant through global counts
kl          per-token KL estimators k1, abs, k2, k3 and the straight-through k1+, abs+, k3+
entropy     token entropy, plain and chunked
shaping     reward shapers (DAPO overlong penalty)
sampling    sampling filters (DAPO dynamic sampling) and the refill loop around them
"""

from megatron_prism.algorithms.advantages import (
    ADVANTAGES,
    compute_advantages,
    drgrpo_advantages,
    grpo_advantages,
    register_advantage,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from megatron_prism.algorithms.discriminator_loss import (
    DISCRIMINATOR_LOSSES,
    bradley_terry_loss,
    discriminator_loss,
    register_discriminator_loss,
)
from megatron_prism.algorithms.game_advantage import group_normalize, prism_game_advantages
from megatron_prism.algorithms.aggregation import AGG_MODES, GlobalCounts, aggregate, local_counts, row_scale
from megatron_prism.algorithms.entropy import entropy_from_logits, entropy_from_logits_chunked
from megatron_prism.algorithms.kl import KL_ESTIMATORS, kl
from megatron_prism.algorithms.policy_loss import POLICY_LOSSES, policy_loss, register_policy_loss
from megatron_prism.algorithms.sampling import SAMPLING_FILTERS, GroupRefillBuffer, register_sampling_filter
from megatron_prism.algorithms.shaping import REWARD_SHAPERS, register_reward_shaper, shape_rewards

__all__ = [
    "ADVANTAGES", "AGG_MODES", "DISCRIMINATOR_LOSSES", "bradley_terry_loss", "discriminator_loss",
    "group_normalize", "prism_game_advantages", "register_discriminator_loss", "GlobalCounts", "GroupRefillBuffer", "KL_ESTIMATORS", "POLICY_LOSSES",
    "REWARD_SHAPERS", "SAMPLING_FILTERS", "aggregate", "compute_advantages", "drgrpo_advantages",
    "entropy_from_logits", "entropy_from_logits_chunked", "grpo_advantages", "kl", "local_counts",
    "policy_loss", "register_advantage", "register_policy_loss", "register_reward_shaper",
    "register_sampling_filter", "reinforce_pp_baseline_advantages", "rloo_advantages", "row_scale",
    "shape_rewards",
]
