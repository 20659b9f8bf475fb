"""The typed shape of a PRISM run: one dataclass per concern, composed by :class:`PrismConfig`.

The dataclasses carry no parsing logic (that lives in :mod:`megatron_prism.config.loader`), so
reading a field's type and default here tells the whole story of what a YAML key accepts. Fields
without a default are required; everything else may be left out of a config file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Generic, Literal, TypeVar

DType = Literal["auto", "float32", "bfloat16", "float16"]
AttentionBackend = Literal["auto", "sdpa", "te", "flash", "fused", "unfused"]
Recompute = Literal["none", "selective", "full"]
Schedule = Literal["constant", "cosine"]
Logger = Literal["tensorboard", "wandb", "none"]
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LossBackend = Literal["auto", "torch", "triton"]
FilterMetric = Literal["acc", "score", "seq_reward"]
StageName = Literal["sft", "warmup", "align", "rlvr", "eval"]
DiscriminatorMode = Literal["routed", "dedicated", "dense", "text-only"]
LrSchedule = Literal["constant", "cosine"]
PartReduction = Literal["sum", "mean"]
PolicyReward = Literal["game", "verifiable"]

#: The order the pipeline runs its stages in. It is fixed by the method (SFT first, RLVR after the
#: discriminator stages, evaluation last), not by the order keys happen to appear in a YAML file.
STAGE_ORDER: tuple[StageName, ...] = ("sft", "warmup", "align", "rlvr", "eval")


@dataclass
class ModelConfig:
    """Which weights the policy starts from and how it is computed.

    ``hf_dir`` is a Hugging Face Qwen3-VL directory, ``megatron_dir`` a checkpoint converted with
    ``prism convert``; with neither set the run uses the built-in tiny random model. ``dtype``
    ``auto`` (the default) is ``bfloat16`` weights with fp32 main gradients and fp32 optimizer
    state on a GPU, and ``float32`` on a CPU (the one dtype that is exact and fast enough there);
    ``float16`` is refused (it needs a loss scaler this trainer does not drive).

    ``attention_backend``: ``sdpa`` is the torch layer spec (any device); ``te`` is Transformer
    Engine's layer spec with TE choosing its attention kernels, ``flash`` / ``fused`` (cuDNN) /
    ``unfused`` the same spec with that kernel family pinned (all four need TE and a GPU);
    ``auto`` is ``te`` where TE imports and CUDA is available, else ``sdpa``. Checkpoints do not
    depend on it: a run may resume or convert under another backend.
    """

    hf_dir: str | None = None
    megatron_dir: str | None = None
    dtype: DType = "auto"
    attention_backend: AttentionBackend = "auto"
    recompute: Recompute = "none"


@dataclass
class ParallelConfig:
    """Megatron-core model parallelism: tensor, pipeline (optionally virtual) and expert."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1


@dataclass
class DataConfig:
    """Where the data comes from and how images become tokens.

    ``root`` is a directory with one sub-directory per split (``sft/``, ``align/``, ``rl/``,
    ``eval/``) of JSONL/Parquet record files; each stage reads its split (a stage's own
    ``data_path`` overrides that). ``null`` generates the embedded synthetic task into
    ``<run.output_dir>/data`` with ``synth_*`` settings. ``lenient`` skips malformed records with a
    counted warning instead of stopping the run. ``min_pixels``/``max_pixels`` bound the resized
    image; ``null`` takes the model directory's ``preprocessor_config.json`` (else Qwen3-VL's released
    defaults, 65536 and 16777216). With ``lenient: false`` every image of a split is decoded when a
    stage opens it, on ``image_check_workers`` threads, so a bad one stops the run before its model
    is built.
    """

    root: str | None = None
    max_seq_len: int = 2048
    seed: int = 1234
    lenient: bool = True
    image_check_workers: int = 2
    min_pixels: int | None = None
    max_pixels: int | None = None
    synth_sizes: str = "sft=2000,align=500,rl=1000,eval=200"


@dataclass
class OptimizerConfig:
    """Adam with decoupled weight decay, gradient clipping and a warm-up then constant/cosine LR."""

    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    schedule: Schedule = "constant"
    # megatron's distributed optimizer (ZeRO-1): fp32 main params and Adam moments sharded over the
    # data-parallel ranks (12 bytes/param / DP for bf16). False keeps the full state on every rank.
    use_distributed_optimizer: bool = True


@dataclass
class RolloutConfig:
    """How responses are sampled. ``embedded`` is the in-process engine that runs anywhere,
    including on a CPU; ``gpu_memory_fraction`` only matters to a colocated GPU engine.

    ``val_n`` / ``val_temperature`` are the held-out evaluation's sampling (verl's
    ``val_kwargs``): ``val_temperature: 0`` is greedy; with ``val_n`` samples per item at a
    temperature the reported accuracy is the mean over samples (pass@1 estimated from ``val_n``
    samples, as DeepSeek-R1 and DAPO report it) and pass@``val_n`` is logged beside it.

    Placement (``rollout.client``): each engine sits on its leader's own GPU and spans ``tp``
    GPUs (1, or a multiple of ``parallel.tp`` with ``parallel.pp`` 1); ``gpu_memory_fraction`` is
    of the GPU's total memory; engines of one node take ports from ``port_base`` on. Ranks that
    wait while their engine generates wait on a gloo group for up to ``wait_timeout_s`` (a
    round of ``n`` x ``max_new_tokens`` can take far longer than NCCL's 600 s watchdog)."""

    engine: str = "embedded"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    gpu_memory_fraction: float = 0.5
    tp: int = 1
    port_base: int = 30000
    wait_timeout_s: float = 3600.0
    val_n: int = 1
    val_temperature: float = 0.0


@dataclass
class AlgorithmConfig:
    """The policy-gradient recipe: advantage estimator, surrogate loss and its regularisers.

    ``reward`` names a reward of :mod:`megatron_prism.rewards` (e.g. ``math_format``: format-gated
    0.8 accuracy + 0.2 format). Names are looked up in the registries of
    :mod:`megatron_prism.algorithms` (``advantage``,
    ``loss``, ``kl_kind``, ``reward_shaping``, ``sampling_filter``), with verl's meanings. ``None``
    for a clip value or ``loss_agg`` takes the loss variant's own default (vanilla = GRPO = PPO
    0.2/0.2 and DAPO 0.2/0.28, both with verl's dual clip 3; GSPO 3e-4/4e-4 with
    ``seq-mean-token-mean`` and no dual clip); ``dual_clip: .inf`` turns the dual clip off.
    ``loss_backend``: ``triton`` is the fused kernel, ``torch`` its reference, ``auto`` the kernel
    on a GPU. ``filter_metric``: what ``sampling_filter`` judges a group on (``acc``, DAPO's and
    verl's default; ``score``, the reward function's value; ``seq_reward``, the shaped reward).
    ``log_entropy``: compute the policy's entropy for its metric even when ``entropy_coef`` is 0
    (the entropy is computed only when one of the two needs it).
    """

    reward: str = "math_format"
    advantage: str = "grpo"
    loss: str = "grpo"
    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    loss_agg: LossAgg | None = None
    loss_backend: LossBackend = "auto"
    reward_shaping: str = "none"
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0
    sampling_filter: str = "none"
    filter_metric: FilterMetric = "acc"
    max_sampling_rounds: int = 10
    log_entropy: bool = True
    ppo_epochs: int = 1
    mini_batches: int = 1


@dataclass
class DiscriminatorConfig:
    """The perception-reasoning discriminator and its optimisation (WARMUP and ALIGN stages).

    Defaults are PRISM's released recipe (github.com/XIAO4579/PRISM); each field names the file it
    comes from. ``megatron_dir``: a discriminator checkpoint
    (``tools/upcycle_discriminator.py``) used as is; else ``hf_dir``: a Qwen3-VL backbone upcycled
    at the start of WARMUP; with both null the policy checkpoint WARMUP starts from (the SFT
    result, a backbone that already reads the task) is upcycled (PRISM upcycles a separate
    Qwen3-VL-2B-Instruct). Upcycling writes ``<warmup>/discriminator_init`` with
    ``upcycle_noise_std``; ALIGN starts from WARMUP's trained discriminator when WARMUP ran. ``mode``: ``routed`` (PRISM: caption and
    think+answer both go through the routed MoE, one score each), ``dedicated`` (a perception expert
    group scores the caption, a reasoning group think+answer), ablations ``dense`` (no MoE) and
    ``text-only`` (no image input).

    Upcycling (PRISM's ``moe/create_vl_moe.py``, ``scripts/train/moe_warmup/create_moe.sh``
    ``NOISE_STD=0.01``): every expert starts as a copy of its layer's dense MLP plus Gaussian noise of
    std ``upcycle_noise_std`` drawn once per expert and weight (gate, up and down), which breaks the
    symmetry between experts; the router starts N(0, ``router_init_std``) and adds no noise to its
    logits, hence ``router_noise`` 0 (megatron's input jitter, for ablations). The ``dense`` mode
    gets the same noise on its one dense MLP, so every arm of an experiment starts from the same
    perturbation of the backbone and ``prism`` vs ``dense-disc`` differs only in the routing.

    ``micro_batch_pairs``: the discriminator scores and trains on micro-batches of this many
    (teacher, policy) pairs (2x rows), lowered to the largest divisor of a rank's pairs per step so
    every micro-batch has the same shape; ``null`` is ``parallel.micro_batch_size`` (the policy's).
    Batched scores equal one-pair-at-a-time scores to float32 rounding (tested).

    ``aux_loss_coef`` is PRISM's ``router_aux_loss_coef`` as Hugging Face means it (one loss over all
    layers, ``topk`` when balanced); megatron's per-layer switch loss (1 when balanced) gets
    ``aux_loss_coef * topk / layers``, the same strength (derived in
    ``models/discriminator/load_balance.py``).
    """

    hf_dir: str | None = None
    megatron_dir: str | None = None
    mode: DiscriminatorMode = "routed"
    num_experts: int = 4  # scripts/train/moe_warmup/create_moe.sh NUM_EXPERTS
    topk: int = 2  # create_moe.sh NUM_EXPERTS_PER_TOK
    norm_topk_prob: bool = True  # moe/create_vl_moe.py norm_topk_prob
    upcycle_noise_std: float = 0.01  # create_moe.sh NOISE_STD: added to each expert copy at upcycling
    router_noise: float = 0.0  # PRISM's router (HF Qwen3-VL-MoE) adds no noise to its logits
    router_init_std: float = 0.02  # create_vl_moe.py: router weights ~ N(0, 0.02)
    aux_loss_coef: float = 0.01  # create_vl_moe.py router_aux_loss_coef, HF's meaning (converted: load_balance.py)
    head_dropout: float = 0.1  # moe/value_head.py v_head = Dropout(0.1) + Linear(hidden, 1, bias=False)
    head_init_std: float = 0.02  # value_head.py _init_v_head: N(0, 0.02)
    warmup_lr: float = 1e-5  # scripts/train/moe_warmup/train_moe_warmup.sh LEARNING_RATE
    warmup_lr_schedule: LrSchedule = "cosine"  # moe/train_moe_vl_warmup_fast.py cosine with warm-up
    warmup_lr_warmup_ratio: float = 0.1  # train_moe_warmup.sh WARMUP_RATIO
    warmup_score_l2: float = 0.0  # train_moe_vl_warmup_fast.py: pairwise loss + aux loss, no score L2
    warmup_part_reduction: PartReduction = "mean"  # warm-up batches mix caption and cot pairs: mean over all
    align_lr: float = 1e-6  # scripts/train/experiment/qwen3_vl_prism.sh critic.optim.lr
    score_l2: float = 0.001  # qwen3_vl_prism.sh critic.score_reg_coef (ALIGN)
    align_part_reduction: PartReduction = "sum"  # verl/workers/critic/dp_critic.py: cap_loss + cot_loss
    weight_decay: float = 0.01  # warm-up AdamW weight_decay; verl critic.optim.weight_decay
    clip_grad: float = 1.0  # warm-up clip_grad_norm_ max_norm; verl critic grad_clip
    micro_batch_pairs: int | None = None  # (teacher, policy) pairs per scoring/training micro-batch; null: parallel.micro_batch_size


@dataclass
class AlignConfig:
    """The ALIGN game: how discriminator part scores become the policy's advantage, and the
    discriminator's step schedule. Defaults from PRISM's ``scripts/train/experiment/qwen3_vl_prism.sh``
    and the ``grpo_multi_reward`` estimator of its ``verl/verl/trainer/ppo/core_algos.py``.

    ``policy_reward``: ``game`` (PRISM) rewards the policy with the discriminator's part scores;
    ``verifiable`` runs the same stage (steps, prompts, ``samples_per_prompt``, optimizer, update)
    with ``algorithm.reward`` and ``algorithm.advantage`` instead, and no discriminator: the
    same-compute control of the ``rl-on-align-prompts`` arm.
    """

    caption_weight: float = 0.5  # qwen3_vl_prism.sh +algorithm.caption_weight
    reasoning_weight: float = 0.5  # qwen3_vl_prism.sh +algorithm.cot_weight
    invalid_penalty: float = 1.5  # qwen3_vl_prism.sh +algorithm.format_penalty
    invalid_offset: float = 1.0  # core_algos.py: an invalid response scores (group min of valid) - 1
    score_clip: float = 10.0  # qwen3_vl_prism.sh +critic.score_clip (scores clamped to [-10, 10])
    eps: float = 1e-6  # core_algos.py epsilon of the group normalisation
    samples_per_prompt: int = 16  # qwen3_vl_prism.sh actor_rollout_ref.rollout.n
    disc_steps_per_policy_step: int = 1  # critic mini-batch = whole step batch, ppo_epochs 1 (verl defaults)
    no_valid_fallback_coef: float = 0.01  # dp_critic.py: loss when no policy response is valid
    policy_reward: PolicyReward = "game"  # verifiable: the same-compute control (module docstring)


T = TypeVar("T")


class Partial(Generic[T]):
    """Annotation of a per-stage section: a mapping that sets *some* keys of the run-wide section
    ``T``; every key it leaves out comes from ``T``. The config builder checks each key and value
    against ``T``'s fields and keeps the mapping as written (a plain dict), so a dumped config still
    shows which keys a stage set itself. Never instantiated."""


#: The run-wide sections a stage may set keys of under ``stages.<name>.<section>``, and which keys,
#: per stage: only what that stage reads. SFT trains the policy but samples nothing (its held-out
#: figures are sampled as every stage's are, with the run-wide ``rollout``); WARMUP trains only the
#: discriminator (``discriminator.warmup_*``) on policy responses it samples; ALIGN's advantage is
#: the game's, so of ``algorithm`` it reads the update keys; RLVR reads all of them. The stage's own
#: learning rate is ``stages.<name>.lr`` (one place), so ``lr`` is not among the ``optim`` keys.
#: Held-out evaluation (``eval``) samples with the run-wide ``rollout``, so that the before/after
#: figures of every stage are measured alike.
_OPTIM_KEYS = ("min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad", "warmup_steps",
               "schedule")
_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k")
_UPDATE_KEYS = ("loss", "clip_low", "clip_high", "dual_clip", "loss_agg", "loss_backend", "kl_coef", "kl_kind",
                "entropy_coef", "log_entropy", "ppo_epochs", "mini_batches")
STAGE_SECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "optim": {"sft": _OPTIM_KEYS, "align": _OPTIM_KEYS, "rlvr": _OPTIM_KEYS},
    "rollout": {"warmup": _SAMPLING_KEYS, "align": _SAMPLING_KEYS, "rlvr": _SAMPLING_KEYS},
    "algorithm": {"align": _UPDATE_KEYS, "rlvr": tuple(f.name for f in fields(AlgorithmConfig))},
}


@dataclass(kw_only=True)
class StageConfig:
    """One pipeline stage. ``name`` is filled from the key the stage is written under.

    ``optim``, ``rollout`` and ``algorithm`` set keys of the run-wide sections of those names for
    this stage only (``stages.align.optim.warmup_steps: 0``, ``stages.rlvr.algorithm.loss: gspo``,
    ``stages.align.rollout.max_new_tokens: 6144``); the keys a stage may set are
    :data:`STAGE_SECTIONS`'. ``null``: the run-wide section as it is.
    """

    name: StageName
    enabled: bool = True
    steps: int
    global_batch_size: int
    save_every: int
    eval_every: int
    output_dir: str | None = None  # None: <run.output_dir>/<stage name>
    data_path: str | None = None
    lr: float | None = None  # None: optim.lr (RL stages usually want a smaller one than SFT)
    optim: Partial[OptimizerConfig] | None = None
    rollout: Partial[RolloutConfig] | None = None
    algorithm: Partial[AlgorithmConfig] | None = None


@dataclass
class RunConfig:
    """Run-wide settings: where everything is written, the global seed, the metrics sink.

    ``name`` names the run in W&B and TensorBoard (``<output_dir>/tensorboard/<name>``; null: the
    output directory's name); ``project`` and ``tags`` are W&B's. ``log_every``: off a terminal
    (a Slurm log) each stage prints one ``[stage] step N/T ...`` line every that many steps."""

    output_dir: str = "outputs/run"
    seed: int = 1234
    logger: Logger = "tensorboard"
    project: str = "megatron_prism"
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    log_every: int = 10


@dataclass
class PrismConfig:
    """A whole run.

    ``stages`` is a dict keyed by stage name rather than a list because (1) the stages are a fixed
    set that runs in the fixed :data:`STAGE_ORDER`, so a list's order would suggest a freedom that
    does not exist; (2) a name cannot appear twice; (3) dotted overrides address a stage by name,
    ``stages.sft.steps=10``, and a misspelt name gets a "did you mean" like any other key. A stage
    missing from the dict is not run, exactly as if it were written with ``enabled: false``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    stages: dict[StageName, StageConfig] = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)

    def enabled_stages(self) -> list[StageConfig]:
        """The stages that will run, in pipeline order."""
        return [self.stages[n] for n in STAGE_ORDER if n in self.stages and self.stages[n].enabled]

    def stage_section(self, stage: str, section: str) -> Any:
        """The ``optim`` / ``rollout`` / ``algorithm`` section ``stage`` runs with: the run-wide one
        with the keys the stage sets itself (and, for ``optim``, ``stages.<stage>.lr``)."""
        base = getattr(self, section)
        entry = self.stages.get(stage)
        if entry is None:
            return base
        own = dict(getattr(entry, section) or {})
        if section == "optim" and entry.lr is not None:
            own["lr"] = entry.lr
        return replace(base, **own) if own else base

    def for_stage(self, stage: str) -> "PrismConfig":
        """A copy of this config whose ``optim``, ``rollout`` and ``algorithm`` are the ones
        ``stage`` runs with (:meth:`stage_section`); the pipeline hands each stage this view, so
        stage code reads ``cfg.algorithm`` etc. and gets its own settings."""
        return replace(self, **{s: self.stage_section(stage, s) for s in STAGE_SECTIONS})
