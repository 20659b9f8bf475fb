"""Validate first: every rule a resolved config must satisfy, checked before anything is built.

``load_config`` already guarantees the *shape* of a config (known keys, right types, literal
choices). This module checks what a type cannot say, so that a mistake costs a second, not a run
that dies after SFT:

* every **registered name** (reward, advantage, loss, KL kind, shaper, filter, rollout engine)
  against its registry, with a "did you mean";
* every **size and ratio** against its range (``parallel.tp=0``, ``stages.sft.steps=-3``,
  ``rollout.top_p=1.5``, ``data.synth_sizes=sft=abc``);
* **cross-key rules**: virtual pipeline needs ``pp > 1``; TP divides the attention and KV heads
  (and the MLP; the vocabulary is padded), PP x VPP the layers, EP the discriminator's experts and the
  data-parallel size; a rollout engine of its own TP divides the ranks; and, for a known number of
  ranks, every training stage's global batch splits into whole micro-batches on every
  data-parallel rank (:func:`largest_useful_dp` says how far a stage's batch can be spread);
* **paths** that must exist: model and discriminator directories, ``data.root`` and the split each
  enabled stage reads, a stage's ``data_path``; with ``data.lenient: false`` every record those
  splits hold is parsed up front, so a malformed one stops the run before anything is built.

``check_config`` raises :class:`ConfigError` (a bad record: ``RecordError``) with one line naming the key, where it was set (the
file or the override) and the fix; when several rules fail the first is shown with a count of the
rest. ``prism run|eval|experiment|plan`` call it right after loading. ``prism plan`` asks for the
rules without paths (it plans before the data is downloaded) and reports the batch rule per stage
itself, from the same :func:`stage_batch_problem`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_prism.config.build import _Builder
from megatron_prism.config.errors import ConfigError
from megatron_prism.config.loader import parse_override
from megatron_prism.config.schema import STAGE_SECTIONS, PrismConfig, StageConfig
from megatron_prism.data.records import DATA_SUFFIXES

#: The data split each stage reads from ``data.root`` (a stage's ``data_path`` replaces it).
STAGE_SPLITS: dict[str, str] = {"sft": "sft", "warmup": "align", "align": "align", "rlvr": "rl", "eval": "eval"}
#: Stages that train and therefore step through global batches.
TRAINING_STAGES = ("sft", "warmup", "align", "rlvr")


@dataclass(frozen=True)
class Problem:
    key: str
    message: str  # what is wrong and the fix, without the key (added when formatted)


def synth_sizes(text: str) -> dict[str, int]:
    """``"sft=2000,align=500,rl=1000,eval=200"`` -> sizes; ValueError naming the bad item. An
    optional ``max_response_tokens=N`` sets the generator's demonstration budget (default 64)."""
    sizes: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in ("sft", "align", "rl", "eval", "max_response_tokens"):
            raise ValueError(f"{item!r} is not SPLIT=COUNT with SPLIT one of sft, align, rl, eval "
                             "(or max_response_tokens=N)")
        if name in sizes:
            raise ValueError(f"split {name!r} is given twice")
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"{item!r}: the count {value.strip()!r} is not a whole number") from None
        if count < 1:
            raise ValueError(f"{item!r}: the count must be at least 1")
        sizes[name] = count
    missing = [s for s in ("sft", "align", "rl", "eval") if s not in sizes]
    if missing:
        raise ValueError(f"no size for split(s) {', '.join(missing)}")
    return sizes


# ----------------------------------------------------------------------------------- batch rule

def sequences_per_prompt(cfg: PrismConfig, stage: str) -> int:
    """How many sequences one record of ``stage``'s global batch becomes in its update."""
    if stage == "align":
        return cfg.align.samples_per_prompt
    if stage == "rlvr":
        return cfg.rollout.n
    return 1  # sft: one demonstration; warmup: one (teacher, policy) pair per micro-batch slot


def micro_batch_unit(stage: str, micro_batch_size: int) -> int:
    """Sequences (WARMUP: pairs) per micro-batch of ``stage``. SFT packs its records into rows of
    ``data.max_seq_len`` tokens, one row per micro-batch, so it needs only one record per rank."""
    return 1 if stage == "sft" else micro_batch_size


def largest_dp_for(stage: str, global_batch: int, per_prompt: int, micro_batch_size: int) -> int:
    """The largest data-parallel size over which a global batch of ``global_batch`` records, each
    ``per_prompt`` sequences, still splits into whole micro-batches on every rank (0: none)."""
    unit = micro_batch_unit(stage, micro_batch_size)
    for dp in range(global_batch, 0, -1):
        if global_batch % dp == 0 and (global_batch // dp * per_prompt) % unit == 0:
            return dp
    return 0


def batch_split_problem(stage: str, global_batch: int, per_prompt: int, micro_batch_size: int, dp: int,
                        mini_batches: int = 1) -> str | None:
    """Why a stage's global batch cannot be split over ``dp`` data-parallel ranks into whole
    micro-batches (and, for the policy-gradient stages, equal mini-batches); None when it can."""
    unit = micro_batch_unit(stage, micro_batch_size)
    useful = largest_dp_for(stage, global_batch, per_prompt, micro_batch_size)
    hint = f"the largest data-parallel size this batch can use is {useful}" if useful else \
        f"no data-parallel size can use it: make it a multiple of the micro-batch size {unit}"
    if global_batch % dp:
        return (f"does not split over {dp} data-parallel ranks ({hint}); use fewer ranks or a global batch that "
                f"is a multiple of {dp}")
    per_rank = global_batch // dp * per_prompt
    if per_rank % unit:
        what = "sequences" if per_prompt > 1 else ("pairs" if stage == "warmup" else "records")
        return (f"gives each of {dp} data-parallel ranks {per_rank} {what} per step, not whole micro-batches of "
                f"parallel.micro_batch_size={unit} ({hint})")
    if stage in ("align", "rlvr") and (per_rank // unit) % mini_batches:
        return (f"gives each data-parallel rank {per_rank // unit} micro-batches per step, which "
                f"algorithm.mini_batches={mini_batches} does not divide into equal mini-batches")
    return None


def stage_batch_problem(cfg: PrismConfig, stage: StageConfig, dp: int) -> str | None:
    """:func:`batch_split_problem` for a stage of ``cfg`` at ``dp`` data-parallel ranks."""
    return batch_split_problem(stage.name, stage.global_batch_size, sequences_per_prompt(cfg, stage.name),
                               cfg.parallel.micro_batch_size, dp, cfg.stage_section(stage.name, "algorithm").mini_batches)


def largest_useful_dp(cfg: PrismConfig, stage: StageConfig) -> int:
    """The largest data-parallel size ``stage``'s global batch can use (0: none); more ranks than
    this cannot speed the stage up."""
    return largest_dp_for(stage.name, stage.global_batch_size, sequences_per_prompt(cfg, stage.name),
                          cfg.parallel.micro_batch_size)


# ------------------------------------------------------------------------------------ the check

@dataclass
class _Check:
    cfg: PrismConfig
    builder: _Builder
    policy_shape: Any = None  # plan.shapes.ModelShape, when the caller knows it (prism plan --preset)
    problems: list[Problem] = field(default_factory=list)
    unknown_names: set[str] = field(default_factory=set)  # keys whose name is not registered

    def get(self, key: str) -> Any:
        """The value at a dotted key; under ``stages.<name>.<section>`` the section the stage runs
        with (its own keys over the run-wide ones)."""
        parts = key.split(".")
        node: Any = self.cfg
        if len(parts) >= 3 and parts[0] == "stages" and parts[2] in STAGE_SECTIONS and parts[1] in self.cfg.stages:
            node, parts = self.cfg.stage_section(parts[1], parts[2]), parts[3:]
        for part in parts:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        return node

    def fail(self, key: str, message: str) -> None:
        """A problem at ``key``; a stage key the stage did not set itself is reported where it was
        set, at the run-wide key (``stages.rlvr.optim.warmup_steps`` -> ``optim.warmup_steps``)."""
        parts = key.split(".")
        if len(parts) >= 4 and parts[0] == "stages" and parts[2] in STAGE_SECTIONS:
            stage = self.cfg.stages.get(parts[1])
            own = getattr(stage, parts[2], None) if stage is not None else None
            if not own or parts[3] not in own:
                key = ".".join(parts[2:])
        self.problems.append(Problem(key, message))

    def at_least(self, key: str, low: float, what: str) -> None:
        value = self.get(key)
        if value is not None and value < low:
            self.fail(key, f"{what} must be at least {low:g}")

    def within(self, key: str, low: float, high: float, what: str, *, low_open: bool = False,
               high_open: bool = False) -> None:
        value = self.get(key)
        if value is None:
            return
        bad = value < low or value > high or (low_open and value == low) or (high_open and value == high)
        if bad:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            self.fail(key, f"{what} must lie in {interval}")

    def name(self, key: str, registry) -> None:
        from megatron_prism.registry import UnknownNameError

        try:
            registry.get(self.get(key))
        except UnknownNameError as exc:
            self.fail(key, str(exc))
            self.unknown_names.add(key)

    def format(self, problem: Problem) -> str:
        try:
            parts = problem.key.split(".")
            if len(parts) == 3 and parts[0] == "stages" and parts[2] in STAGE_SECTIONS:
                value = getattr(self.cfg.stages[parts[1]], parts[2])  # the section as written, not resolved
            else:
                value = self.get(problem.key)
            shown = "null" if value is None else repr(value)
            head = f"key '{problem.key}' {self.builder.where(problem.key)} is {shown}"
        except (AttributeError, KeyError, TypeError):  # a problem about a key the schema lacks
            head = f"'{problem.key}' {self.builder.where(problem.key)}"
        return f"{head}: {problem.message}"


def _ranges(c: _Check) -> None:
    cfg = c.cfg
    for key, what in (("parallel.tp", "the tensor-parallel size"), ("parallel.pp", "the pipeline-parallel size"),
                      ("parallel.vpp", "the virtual pipeline size"), ("parallel.ep", "the expert-parallel size"),
                      ("parallel.micro_batch_size", "the micro-batch size")):
        c.at_least(key, 1, what)
    if cfg.model.dtype == "float16":
        c.fail("model.dtype", "float16 needs megatron's loss scaler, which this trainer does not drive; use "
                              "model.dtype=bfloat16 (fp32 main grads, the GPU default 'auto') or float32")
    c.at_least("data.max_seq_len", 1, "the sequence length")
    c.at_least("data.min_pixels", 1, "the smallest image size in pixels")
    c.at_least("data.image_check_workers", 1, "the threads that decode a split's images in strict mode")
    c.at_least("data.seed", 0, "a seed")
    c.at_least("data.max_pixels", 1, "the largest image size in pixels")
    if None not in (cfg.data.min_pixels, cfg.data.max_pixels) and cfg.data.max_pixels < cfg.data.min_pixels:
        c.fail("data.max_pixels", f"must be at least data.min_pixels={cfg.data.min_pixels}")
    try:
        synth_sizes(cfg.data.synth_sizes)
    except ValueError as exc:
        c.fail("data.synth_sizes", f"{exc}; write e.g. sft=2000,align=500,rl=1000,eval=200")
    _optim_ranges(c, "optim")
    r = "rollout"
    c.at_least(f"{r}.n", 1, "the number of samples per prompt")
    _sampling_ranges(c, r)
    c.within(f"{r}.gpu_memory_fraction", 0, 1, "the engine's share of GPU memory", low_open=True, high_open=True)
    c.at_least(f"{r}.val_n", 1, "the number of held-out samples per item")
    c.at_least(f"{r}.val_temperature", 0, "a sampling temperature (0: greedy)")
    c.at_least(f"{r}.tp", 1, "the rollout engine's tensor-parallel size")
    if cfg.rollout.tp > 1 and (cfg.rollout.tp % cfg.parallel.tp or cfg.parallel.pp != 1):
        c.fail(f"{r}.tp", f"{cfg.rollout.tp} must be a multiple of parallel.tp ({cfg.parallel.tp}) with parallel.pp 1 "
                          f"(now {cfg.parallel.pp}): an engine spans whole model-parallel groups of consecutive ranks")
    c.at_least(f"{r}.port_base", 1024, "the first port of the node's rollout engines")
    c.at_least(f"{r}.wait_timeout_s", 1, "how long ranks wait for their engine's generation, in seconds")
    _algorithm_ranges(c, "algorithm")
    d = "discriminator"
    c.at_least(f"{d}.num_experts", 1, "the number of experts")
    if not 1 <= cfg.discriminator.topk <= max(cfg.discriminator.num_experts, 1):
        c.fail(f"{d}.topk", f"must lie in [1, discriminator.num_experts={cfg.discriminator.num_experts}]")
    for key in ("upcycle_noise_std", "router_noise", "aux_loss_coef", "warmup_lr", "warmup_score_l2", "align_lr",
                "score_l2", "weight_decay", "clip_grad"):
        c.at_least(f"{d}.{key}", 0, key.replace("_", " "))
    c.at_least(f"{d}.micro_batch_pairs", 1, "the pairs per discriminator micro-batch")
    for key in ("router_init_std", "head_init_std"):
        c.within(f"{d}.{key}", 0, float("inf"), "an initialisation std", low_open=True)
    c.within(f"{d}.head_dropout", 0, 1, "a dropout rate", high_open=True)
    c.within(f"{d}.warmup_lr_warmup_ratio", 0, 1, "the warm-up share of WARMUP's steps", high_open=True)
    a = "align"
    for key in ("caption_weight", "reasoning_weight", "invalid_penalty", "invalid_offset", "no_valid_fallback_coef"):
        c.at_least(f"{a}.{key}", 0, key.replace("_", " "))
    if cfg.align.caption_weight == 0 and cfg.align.reasoning_weight == 0:
        c.fail(f"{a}.reasoning_weight", "and align.caption_weight are both 0: the game would have no reward")
    c.within(f"{a}.score_clip", 0, float("inf"), "the score clip", low_open=True)
    c.within(f"{a}.eps", 0, 1, "the normalisation epsilon", low_open=True)
    c.at_least(f"{a}.samples_per_prompt", 2, "the group size (scores are normalised within a prompt's group)")
    c.at_least(f"{a}.disc_steps_per_policy_step", 1, "the discriminator steps per policy step")
    c.at_least("run.seed", 0, "a seed")
    c.at_least("run.log_every", 1, "the step-line interval")
    if not cfg.run.project.strip():
        c.fail("run.project", "must name a W&B project (default megatron_prism)")
    for stage in cfg.stages.values():
        s = f"stages.{stage.name}"
        trains = stage.name in TRAINING_STAGES
        c.at_least(f"{s}.steps", 1 if trains and stage.enabled else 0, f"the {stage.name} step count")
        c.at_least(f"{s}.global_batch_size", 1, "a global batch size")
        c.at_least(f"{s}.save_every", 1, "the checkpoint interval in steps")
        c.at_least(f"{s}.eval_every", 0, "the held-out evaluation interval (0: none)")
        c.at_least(f"{s}.lr", 0, "a learning rate")
    if "rlvr" in cfg.stages and cfg.stages["rlvr"].enabled and cfg.rollout.n < 2:
        c.fail(f"{r}.n", "RLVR's advantages compare the samples of a prompt with each other: use at least 2")
    _stage_sections(c)


def _optim_ranges(c: _Check, o: str) -> None:
    """The optimizer rules, for the run-wide ``optim`` or a stage's (``stages.sft.optim``)."""
    opt = c.get(o)
    if o != "optim":
        if opt.lr < 0:
            return  # the stage's lr rule says it
    else:
        c.at_least(f"{o}.lr", 0, "a learning rate")
    c.at_least(f"{o}.min_lr", 0, "a learning rate")
    if opt.min_lr > opt.lr:
        lr_key = "optim.lr" if o == "optim" else o.rsplit(".", 1)[0] + ".lr"
        c.fail(f"{o}.min_lr", f"is above {lr_key}={opt.lr:g}; the schedule decays from lr down to min_lr")
    c.at_least(f"{o}.weight_decay", 0, "weight decay")
    c.within(f"{o}.adam_beta1", 0, 1, "an Adam beta", high_open=True)
    c.within(f"{o}.adam_beta2", 0, 1, "an Adam beta", high_open=True)
    c.within(f"{o}.adam_eps", 0, 1, "Adam's epsilon", low_open=True)
    c.at_least(f"{o}.clip_grad", 0, "the gradient clip norm (0: no clipping)")
    c.at_least(f"{o}.warmup_steps", 0, "the number of warm-up steps")


def _sampling_ranges(c: _Check, r: str) -> None:
    """The sampling rules, for the run-wide ``rollout`` or a stage's (``stages.align.rollout``)."""
    ro = c.get(r)
    c.at_least(f"{r}.temperature", 0, "a sampling temperature (0: greedy)")
    c.within(f"{r}.top_p", 0, 1, "top-p", low_open=True)
    if ro.top_k != -1 and ro.top_k < 1:
        c.fail(f"{r}.top_k", "top-k is -1 (off) or at least 1")
    c.at_least(f"{r}.max_new_tokens", 1, "the response budget")
    if ro.max_new_tokens >= c.cfg.data.max_seq_len >= 1:
        c.fail(f"{r}.max_new_tokens", f"leaves no room for the prompt within data.max_seq_len={c.cfg.data.max_seq_len} "
                                      "(prompt + response); lower it or raise data.max_seq_len")


def _stage_sections(c: _Check) -> None:
    """Per-stage sections: only under a stage that reads them, only the keys it reads, each by the
    run-wide section's rules; and a warm-up that ends before the stage's last update."""
    cfg = c.cfg
    for stage in cfg.stages.values():
        s = f"stages.{stage.name}"
        for section, per_stage in STAGE_SECTIONS.items():
            own = getattr(stage, section)
            if own is None:
                continue
            if stage.name not in per_stage:
                readers = ", ".join(f"stages.{n}.{section}" for n in per_stage)
                c.fail(f"{s}.{section}", f"stage {stage.name} does not read the {section} section (it may be set under "
                                         f"{readers}, or run-wide as {section}); drop it")
                continue
            for key in own:
                if key not in per_stage[stage.name]:
                    why = (f"the stage's learning rate is {s}.lr" if (section, key) == ("optim", "lr") else
                           f"stage {stage.name} does not read it per stage; set it run-wide as {section}.{key}")
                    c.fail(f"{s}.{section}.{key}", f"is not a per-stage key here: {why}")
            if any(k not in per_stage[stage.name] for k in own):
                continue
            {"optim": _optim_ranges, "rollout": _sampling_ranges, "algorithm": _algorithm_ranges}[section](
                c, f"{s}.{section}")
        if stage.name in ("sft", "align", "rlvr") and stage.enabled and stage.steps >= 1:
            opt = cfg.stage_section(stage.name, "optim")
            updates = stage.steps
            if stage.name != "sft":
                alg = cfg.stage_section(stage.name, "algorithm")
                updates *= max(alg.ppo_epochs, 1) * max(alg.mini_batches, 1)
            if opt.warmup_steps > 0 and opt.warmup_steps >= updates:
                c.fail(f"{s}.optim.warmup_steps",
                       f"is not shorter than stage {stage.name}'s {updates} optimizer step(s): the schedule would cut "
                       f"the warm-up short (its first update runs at lr 0); set {s}.optim.warmup_steps below "
                       f"{updates} (0: none)")


def _algorithm_ranges(c: _Check, a: str) -> None:
    alg = c.get(a)
    c.within(f"{a}.clip_low", 0, 1, "a clip ratio", low_open=True, high_open=True)
    c.within(f"{a}.clip_high", 0, float("inf"), "a clip ratio", low_open=True)
    if alg.dual_clip is not None and alg.dual_clip <= 1:
        c.fail(f"{a}.dual_clip", "the dual-clip bound must be above 1 (DAPO uses 3)")
    c.at_least(f"{a}.kl_coef", 0, "a KL coefficient")
    c.at_least(f"{a}.entropy_coef", 0, "an entropy coefficient")
    c.at_least(f"{a}.overlong_buffer", 0, "the overlong buffer")
    c.at_least(f"{a}.overlong_penalty_factor", 0, "the overlong penalty factor")
    c.at_least(f"{a}.max_sampling_rounds", 1, "the number of sampling rounds")
    c.at_least(f"{a}.ppo_epochs", 1, "the number of passes over a step's rollouts")
    c.at_least(f"{a}.mini_batches", 1, "the number of optimizer steps per pass")
    if alg.reward_shaping == "dapo_overlong":
        budget = c.get(a.replace("algorithm", "rollout")).max_new_tokens
        if not 0 < alg.overlong_buffer < budget:
            c.fail(f"{a}.overlong_buffer", f"{a}.reward_shaping=dapo_overlong needs a buffer in (0, "
                                           f"rollout.max_new_tokens={budget}): the last tokens of the response "
                                           "budget, over which the penalty ramps up")


def _names(c: _Check) -> None:
    from megatron_prism.algorithms import (ADVANTAGES, KL_ESTIMATORS, POLICY_LOSSES, REWARD_SHAPERS,
                                           SAMPLING_FILTERS)
    from megatron_prism.rewards import REWARDS
    from megatron_prism.rollout import ENGINES

    for key, registry in (("algorithm.reward", REWARDS), ("algorithm.advantage", ADVANTAGES),
                          ("algorithm.loss", POLICY_LOSSES), ("algorithm.kl_kind", KL_ESTIMATORS),
                          ("algorithm.reward_shaping", REWARD_SHAPERS),
                          ("algorithm.sampling_filter", SAMPLING_FILTERS), ("rollout.engine", ENGINES)):
        c.name(key, registry)
    for stage in c.cfg.stages.values():  # names a stage sets itself (the run-wide ones are checked above)
        for name in stage.algorithm or {}:
            if name not in STAGE_SECTIONS["algorithm"].get(stage.name, ()):
                continue  # the per-stage rule says it
            registry = {"reward": REWARDS, "advantage": ADVANTAGES, "loss": POLICY_LOSSES, "kl_kind": KL_ESTIMATORS,
                        "reward_shaping": REWARD_SHAPERS, "sampling_filter": SAMPLING_FILTERS}.get(name)
            if registry is not None:
                c.name(f"stages.{stage.name}.algorithm.{name}", registry)


def _policy_shape(c: _Check):
    """The policy's model shape (its config.json, or the built-in tiny model), or None when the
    directory is missing (reported by the path rules)."""
    from megatron_prism.plan.shapes import PlanError, resolve_policy_shape

    if c.policy_shape is not None:
        return c.policy_shape
    try:
        return resolve_policy_shape(c.cfg.model.hf_dir, c.cfg.model.megatron_dir, None)
    except PlanError:
        return None


def _layout(c: _Check, world_size: int | None, *, batches: bool) -> None:
    cfg, p = c.cfg, c.cfg.parallel
    if min(p.tp, p.pp, p.ep, p.micro_batch_size) < 1 or (p.vpp is not None and p.vpp < 1):
        return  # the range rules said it; nothing below can be computed
    if p.vpp is not None and p.pp < 2:
        c.fail("parallel.vpp", f"needs pipeline parallelism (parallel.pp > 1, it is {p.pp}); set parallel.vpp=null "
                               "or raise parallel.pp")
    if p.sequence_parallel and p.tp < 2:
        c.fail("parallel.sequence_parallel", "splits sequences over tensor-parallel ranks: it needs parallel.tp > 1")
    game = any(n in cfg.stages and cfg.stages[n].enabled for n in ("warmup", "align"))
    if game and cfg.discriminator.mode != "dense" and cfg.discriminator.num_experts % p.ep:
        c.fail("parallel.ep", f"must divide discriminator.num_experts={cfg.discriminator.num_experts} (experts are "
                              "spread evenly over the expert-parallel ranks)")
    shape = _policy_shape(c)
    if shape is not None:
        t = shape.text
        # (the vocabulary need not divide: it is padded to a multiple of TP, as megatron does)
        for what, count in (("attention heads", t.heads), ("KV heads", t.kv_heads), ("MLP width", t.ffn)):
            if count % p.tp:
                c.fail("parallel.tp", f"does not divide the policy's {count} {what} ({shape.name}); choose a divisor "
                                      f"of {count}")
                break
        stages = p.pp * (p.vpp or 1)
        if t.layers % stages:
            key = "parallel.vpp" if p.vpp else "parallel.pp"
            c.fail(key, f"pipeline stages x virtual stages = {stages} does not divide the policy's {t.layers} layers")
        elif shape.vision.deepstack > t.layers // stages:
            c.fail("parallel.pp", f"leaves {t.layers // stages} layers on the first pipeline stage, fewer than the "
                                  f"{shape.vision.deepstack} that receive DeepStack vision features; use fewer stages")
    if world_size is None:
        return
    if world_size % (p.tp * p.pp):
        c.fail("parallel.tp", f"TP {p.tp} x PP {p.pp} = {p.tp * p.pp} does not divide the {world_size} ranks; choose "
                              "TP and PP whose product divides the number of processes")
        return
    dp = world_size // (p.tp * p.pp)
    if game and dp % p.ep:
        c.fail("parallel.ep", f"must divide the data-parallel size {dp} (= {world_size} ranks / TP {p.tp} / PP {p.pp}),"
                              " from which megatron carves the expert-parallel groups")
    rollout_tp = cfg.rollout.tp
    if rollout_tp >= 1 and world_size % rollout_tp:
        c.fail("rollout.tp", f"does not divide the {world_size} ranks: each engine spans rollout.tp ranks")
    for stage in cfg.enabled_stages() if batches else ():
        if stage.name in TRAINING_STAGES and stage.global_batch_size >= 1:
            problem = stage_batch_problem(cfg, stage, dp)
            if problem:
                c.fail(f"stages.{stage.name}.global_batch_size", problem)


def _paths(c: _Check) -> None:
    cfg = c.cfg
    m = cfg.model
    if m.attention_backend not in ("auto", "sdpa"):  # this machine's packages, like its files
        from megatron_prism.models.qwen3vl.spec import transformer_engine_status

        why = transformer_engine_status()
        if why is not None:
            c.fail("model.attention_backend", f"needs Transformer Engine, but {why}; on a CUDA machine install it "
                                              "(pip install --no-build-isolation -e '.[te]'), or use sdpa (or auto)")
    if m.megatron_dir and not (Path(m.megatron_dir) / "prism_checkpoint.json").is_file():
        c.fail("model.megatron_dir", "is not a megatron_prism checkpoint (no prism_checkpoint.json); convert one with "
                                     "`prism convert hf-to-megatron` or point it at a training checkpoint")
    elif m.hf_dir and not m.megatron_dir and not (Path(m.hf_dir) / "config.json").is_file():
        c.fail("model.hf_dir", "has no config.json; point it at a Hugging Face Qwen3-VL directory (or set it to null "
                               "for the built-in tiny model)")
    if any(n in cfg.stages and cfg.stages[n].enabled for n in ("warmup", "align")):
        d = cfg.discriminator
        if d.megatron_dir and not (Path(d.megatron_dir) / "prism_checkpoint.json").is_file():
            c.fail("discriminator.megatron_dir", "is not a discriminator checkpoint (no prism_checkpoint.json); write one "
                                                 "with tools/upcycle_discriminator.py")
        elif d.hf_dir and not d.megatron_dir and not (Path(d.hf_dir) / "config.json").is_file():
            c.fail("discriminator.hf_dir", "has no config.json; point it at a Hugging Face Qwen3-VL directory")
    for stage in cfg.enabled_stages():
        if stage.data_path is not None:
            _split_exists(c, f"stages.{stage.name}.data_path", Path(stage.data_path))
    if cfg.data.root is None:
        return
    root = Path(cfg.data.root)
    if not root.is_dir():
        c.fail("data.root", "is not a directory; point it at a folder with one sub-folder per split (sft/, align/, rl/,"
                            " eval/; README 'Your data'), or set it to null for the synthetic task")
        return
    if not m.hf_dir and not m.megatron_dir and not (root / "tokenizer" / "tokenizer.json").is_file():
        c.fail("data.root", "has no tokenizer/ folder, which the built-in tiny model is built for (it comes with the "
                            "synthetic task); set model.hf_dir to your model, or data.root to null")
    for split, reader in _needed_splits(cfg).items():
        _split_exists(c, "data.root", root / split, reader=reader)


def _needed_splits(cfg: PrismConfig) -> dict[str, str]:
    """``{split under data.root: the stage that reads it}`` (held-out evaluation reads eval/)."""
    needed = {STAGE_SPLITS[s.name]: s.name for s in reversed(cfg.enabled_stages()) if s.data_path is None}
    if any(s.eval_every > 0 for s in cfg.enabled_stages()):
        needed.setdefault("eval", "held-out evaluation")
    return needed


def read_records_strictly(cfg: PrismConfig) -> None:
    """With ``data.lenient: false``, every record every enabled stage will read is parsed now, so the
    first bad one stops the run before anything is built or trained (``RecordError`` naming its
    file and line). Images are decoded later, where the stage opens its split."""
    from megatron_prism.data.records import read_records

    kinds = {"sft": "sft", "align": "align", "rl": "rl", "eval": "eval"}
    paths: list[tuple[Path, str]] = []
    if cfg.data.root is not None:
        paths += [(Path(cfg.data.root) / split, kinds[split]) for split in _needed_splits(cfg)]
    paths += [(Path(s.data_path), kinds[STAGE_SPLITS[s.name]]) for s in cfg.enabled_stages() if s.data_path]
    for path, kind in paths:
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            for _ in read_records(file, kind, strict=True):
                pass


def _split_exists(c: _Check, key: str, path: Path, reader: str | None = None) -> None:
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            c.fail(key, f"{path} is a {path.suffix or 'suffix-less'} file; records are {', '.join(DATA_SUFFIXES)}")
        return
    has = path.is_dir() and any(p.suffix in DATA_SUFFIXES for p in path.iterdir())
    if not has:
        why = f" (read by {reader})" if reader else ""
        state = "is an empty folder" if path.is_dir() else "does not exist"
        c.fail(key, f"split folder {path}{why} {state}; it needs {'/'.join(DATA_SUFFIXES)} record files "
                    f"(README 'Your data'; `prism import` converts ShareGPT, LLaMA-Factory and verl files)")


def check_config(cfg: PrismConfig, *, source: str = "<config>", overrides: Sequence[str] = (),
                 world_size: int | None = None, names: bool = True, paths: bool = True, layout: bool = True,
                 batches: bool = True, policy_shape: Any = None) -> None:
    """Every rule of this module; raises :class:`ConfigError` (one line) on the first failure.

    ``source``/``overrides`` (as given to ``load_config``) only shape the message. ``world_size``
    enables the rules that need the number of ranks (None: unknown, skipped). ``layout=False``
    skips the parallel-layout rules (``prism plan --auto`` chooses the layout itself);
    ``batches=False`` leaves the per-stage batch rule to the caller (``prism plan`` reports it per
    stage). ``policy_shape`` replaces reading the policy's config.json (``prism plan --preset``).
    """
    problems = find_problems(cfg, source=source, overrides=overrides, world_size=world_size, names=names,
                             paths=paths, layout=layout, batches=batches, policy_shape=policy_shape)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    if paths and not cfg.data.lenient:
        read_records_strictly(cfg)


def find_problems(cfg: PrismConfig, *, source: str = "<config>", overrides: Sequence[str] = (),
                  world_size: int | None = None, names: bool = True, paths: bool = True, layout: bool = True,
                  batches: bool = True, policy_shape: Any = None) -> list[str]:
    """The one-line message of every rule ``cfg`` breaks, in a fixed order (ranges, names, layout,
    paths); the arguments are :func:`check_config`'s."""
    origins = {parse_override(raw)[0]: raw for raw in overrides}
    c = _Check(cfg, _Builder(source, origins), policy_shape)
    _ranges(c)
    if names:
        _names(c)
    if layout:
        _layout(c, world_size, batches=batches)
    if paths:
        _paths(c)
    seen: set[tuple[str, str]] = set()
    out = []
    for problem in c.problems:
        if (problem.key, problem.message) not in seen:
            seen.add((problem.key, problem.message))
            out.append(c.format(problem))
    return out


def positive_int(text: str) -> int:
    """An ``argparse`` type for a size (``--tp``, ``--k``): a whole number of at least 1, else argparse's
    own one-line usage error (exit 2) naming the option."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """The number of ranks of this launch (torchrun's WORLD_SIZE; a plain process is one rank)."""
    env = os.environ if environ is None else environ
    try:
        return max(int(env.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def launcher_world_size(launcher: str) -> int | None:
    """Ranks a ``prism experiment --launcher`` command starts (``torchrun --nnodes N
    --nproc-per-node G``), or None when it cannot be read from the command line."""
    import shlex

    if not launcher.strip():
        return 1
    words = shlex.split(launcher)
    values: dict[str, str] = {}
    for i, word in enumerate(words):
        for flag in ("--nproc-per-node", "--nproc_per_node", "--nnodes"):
            if word == flag and i + 1 < len(words):
                values[flag.replace("_", "-")] = words[i + 1]
            elif word.startswith(flag + "="):
                values[flag.replace("_", "-")] = word.split("=", 1)[1]
    try:
        per_node = int(values.get("--nproc-per-node", ""))
        nodes = int(values.get("--nnodes", "1").split(":")[-1])
    except ValueError:
        return None
    return per_node * nodes



# ------------------------------------------------------------------- the commands' other inputs

def check_model_dir(path: str | Path, flag: str) -> None:
    """A checkpoint argument: a Hugging Face directory (config.json) or a megatron_prism checkpoint
    (prism_checkpoint.json). ConfigError naming ``flag``."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{flag} {p}: no such directory; give a Hugging Face model directory or a checkpoint "
                          "(<run>/<stage>/checkpoints/step_N)")
    if not any((p / name).is_file() for name in ("config.json", "prism_checkpoint.json", "hf/config.json")):
        raise ConfigError(f"{flag} {p}: neither a Hugging Face model directory (config.json) nor a megatron_prism "
                          "checkpoint (prism_checkpoint.json)")


def check_eval_inputs(*, checkpoint: str | Path, split: str | None, benchmarks: Sequence[str],
                      image_root: str | None = None) -> list:
    """``prism eval``'s own arguments, checked before the model is built; returns the parsed
    ``--benchmark`` specs (eval.BenchmarkSpec)."""
    from megatron_prism.eval import parse_benchmark

    if not benchmarks and split is None:
        raise ConfigError("nothing to evaluate: give --split DIR (held-out records) and/or --benchmark "
                          "NAME=PATH[:SPLIT]")
    check_model_dir(checkpoint, "--checkpoint")
    if split is not None and not (Path(split).is_file() or (Path(split).is_dir() and any(
            p.suffix in DATA_SUFFIXES for p in Path(split).iterdir()))):
        raise ConfigError(f"--split {split}: no {'/'.join(DATA_SUFFIXES)} record files there")
    if image_root is not None and not Path(image_root).is_dir():
        raise ConfigError(f"--image-root {image_root}: no such directory")
    return [parse_benchmark(text) for text in benchmarks]


def check_experiment(config: str | Path, overrides: Sequence[str], arm_names: str, algorithm: str,
                     launcher: str) -> list:
    """Every arm's resolved config (the user's overrides, the arm's, the algorithm's) checked with
    the ranks the launcher starts; returns the arms (experiments.Arm)."""
    from megatron_prism.config.loader import load_config
    from megatron_prism.experiments.arms import ALGORITHMS, parse_arms

    arms = parse_arms(arm_names)
    world = launcher_world_size(launcher)
    for arm in arms:
        cfg = load_config(config, [*overrides, *arm.overrides, *ALGORITHMS[algorithm]])
        try:
            check_config(cfg, source=str(config), overrides=overrides, world_size=world)
        except ConfigError as exc:
            raise ConfigError(f"arm {arm.name}: {exc}") from None
    return arms
