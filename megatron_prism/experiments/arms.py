"""Named experiment arms (sets of config overrides) and the RL algorithm variants.

An arm is what the paper's referee asked to compare: the baseline (SFT -> RLVR), PRISM (SFT ->
WARMUP -> ALIGN -> RLVR), the control that gives SFT the alignment demonstrations without the game
(``align-data-as-sft``), the control that gives RL ALIGN's compute on the align prompts without the
game (``rl-on-align-prompts``: the ALIGN stage with ``align.policy_reward=verifiable``, so its
steps, prompts, samples per prompt, optimizer and update are ALIGN's by construction), and
discriminator ablations. Arms are registered by name like the
algorithms; adding one is one :func:`register_arm` call.

``align-data-as-sft`` needs its SFT stage to read the SFT split *and* the alignment split's
demonstrations. The runner builds that merged split once (``merge_splits``) and points
``stages.sft.data_path`` at it, so the pipeline and the SFT stage need no new option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_prism.registry import Registry


@dataclass(frozen=True)
class Arm:
    """``overrides``: dotted ``key=value`` applied after the user's; ``sft_splits``: the data splits
    the SFT stage trains on (merged by the runner when more than ``("sft",)``)."""

    name: str
    description: str
    overrides: tuple[str, ...]
    sft_splits: tuple[str, ...] = ("sft",)
    stages: tuple[str, ...] = field(default=("sft", "rlvr", "eval"))


ARMS: Registry[Arm] = Registry("experiment arm")


def register_arm(arm: Arm) -> Arm:
    return ARMS.register(arm.name)(arm)


_NO_GAME = ("stages.warmup.enabled=false", "stages.align.enabled=false")
_GAME = ("stages.warmup.enabled=true", "stages.align.enabled=true")
_GAME_STAGES = ("sft", "warmup", "align", "rlvr", "eval")

register_arm(Arm("baseline", "SFT -> RLVR", _NO_GAME))
register_arm(Arm("prism", "SFT -> WARMUP -> ALIGN -> RLVR (routed MoE discriminator)",
                 (*_GAME, "discriminator.mode=routed"), stages=_GAME_STAGES))
register_arm(Arm("align-data-as-sft", "the alignment demonstrations added to SFT, then RLVR (no game)",
                 _NO_GAME, sft_splits=("sft", "align")))
register_arm(Arm("rl-on-align-prompts", "the same-compute control: SFT -> RL with the verifiable reward on the align "
                 "prompts, ALIGN's updates and samples (no discriminator) -> RLVR",
                 ("stages.warmup.enabled=false", "stages.align.enabled=true", "align.policy_reward=verifiable"),
                 stages=("sft", "align", "rlvr", "eval")))
register_arm(Arm("dense-disc", "PRISM with a dense (no MoE) discriminator",
                 (*_GAME, "discriminator.mode=dense"), stages=_GAME_STAGES))
register_arm(Arm("text-only-disc", "PRISM with a discriminator that sees no image",
                 (*_GAME, "discriminator.mode=text-only"), stages=_GAME_STAGES))
register_arm(Arm("dedicated-experts", "PRISM with dedicated perception / reasoning expert groups",
                 (*_GAME, "discriminator.mode=dedicated"), stages=_GAME_STAGES))

#: The RL algorithm of the RLVR stage, and of RLVR only (``stages.rlvr.algorithm``): SFT and ALIGN
#: keep theirs, as in PRISM, where one ALIGN checkpoint (PPO clip 0.2) feeds all three RL algorithms.
#: DAPO is its loss (decoupled clip 0.2/0.28, token-mean) with dynamic sampling (groups whose
#: rewards are all equal are dropped and refilled), as in Yu et al. 2025; GSPO is its
#: sequence-level loss (Zheng et al. 2025).
_RLVR = "stages.rlvr.algorithm."
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "grpo": (f"{_RLVR}loss=grpo", f"{_RLVR}advantage=grpo", f"{_RLVR}sampling_filter=none"),
    "dapo": (f"{_RLVR}loss=dapo", f"{_RLVR}advantage=grpo", f"{_RLVR}sampling_filter=dapo_dynamic"),
    "gspo": (f"{_RLVR}loss=gspo", f"{_RLVR}advantage=grpo", f"{_RLVR}sampling_filter=none"),
}


def parse_arms(text: str) -> list[Arm]:
    """``"baseline,prism"`` -> the registered arms, in order; unknown names are errors with a
    suggestion, duplicates are errors."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--arms needs at least one arm name (registered: {', '.join(ARMS.names())})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--arms names {', '.join(dup)} more than once")
    return [ARMS.get(n) for n in names]
