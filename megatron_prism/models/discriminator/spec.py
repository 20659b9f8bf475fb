"""What a discriminator is (:class:`DiscriminatorSpec`) and its megatron layer spec and config.

The decoder layer is the policy's Qwen3 layer (:func:`qwen3vl_layer_spec`: RMSNorm, QK-norm GQA
attention with interleaved MRoPE, DeepStack) with the MLP slot replaced by megatron-core's own
``MoELayer``: its ``TopKRouter`` (here :class:`PartAwareRouter`, a subclass), token dispatcher
(alltoall or allgather, expert parallelism over megatron's EP groups), ``SequentialMLP`` experts
(each a SwiGLU MLP with the dense MLP's shapes; no grouped GEMM, so it runs on CPU too), the
switch load-balancing aux loss, and router noise through megatron's ``moe_input_jitter_eps``.

Modes (``DiscriminatorSpec.mode``):

* ``routed``: PRISM. Every token goes through the routed MoE (top-k of E).
* ``dedicated``: experts ``[0, perception_experts)`` serve caption tokens, the rest serve
  think+answer tokens; prompt tokens may use any expert. The router masks the other group's
  logits per token (:class:`PartAwareRouter`); ``topk`` must fit in each group.
* ``dense``: no MoE, the backbone's dense MLP (ablation).
* ``text-only``: ``routed`` without image input: the scoring batch drops pixel values and image
  pad tokens (:mod:`.batch`); the checkpoint is the same as ``routed``.

PRISM's numbers (its moe/create_vl_moe.py and warm-up scripts) are the defaults: 4 experts, top-2,
aux loss 0.01 (as Hugging Face means it, converted for megatron: :mod:`.load_balance`), router init
N(0, 0.02) and no router noise, expert noise 0.01 (Gaussian, std 0.01, added once to every expert's
copy of the dense MLP weights at upcycling, :mod:`.upcycle`), score head dropout 0.1 + linear
N(0, 0.02). The noise is a sizeable perturbation of weights of std ~0.02, and it is PRISM's choice:
it breaks the symmetry between experts, so this project reproduces it (``expert_noise``; ``0``
keeps exact copies, for which the MoE equals the dense model at init). megatron's router input
jitter (``router_jitter``, multiplicative U(1-eps, 1+eps)) stays available for ablations, off by
default as PRISM's router has none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec

MODES = ("routed", "dedicated", "dense", "text-only")
MOE_MODES = ("routed", "dedicated", "text-only")


@dataclass(frozen=True)
class DiscriminatorSpec:
    """The shape and routing of a discriminator (stored in its checkpoint's manifest)."""

    mode: str = "routed"
    experts: int = 4
    topk: int = 2
    perception_experts: int | None = None  # dedicated: size of the caption group (default E // 2)
    aux_loss_coeff: float = 0.01  # PRISM's router_aux_loss_coef (HF's meaning; see load_balance.py)
    router_jitter: float = 0.0  # megatron moe_input_jitter_eps; 0 (PRISM: no router noise) disables
    dispatcher: str = "alltoall"  # alltoall | allgather

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "dense":
            return
        if self.experts < 2 or not 1 <= self.topk <= self.experts:
            raise ValueError(f"need experts >= 2 and 1 <= topk <= experts, got experts={self.experts} topk={self.topk}")
        if self.dispatcher not in ("alltoall", "allgather"):
            raise ValueError(f"dispatcher must be alltoall or allgather, got {self.dispatcher!r}")
        if self.mode == "dedicated":
            p = self.perception_group_size
            if not 1 <= p < self.experts or self.topk > min(p, self.experts - p):
                raise ValueError(
                    f"dedicated mode splits {self.experts} experts into {p} (caption) + {self.experts - p} "
                    f"(think+answer); top-{self.topk} must fit in each group"
                )

    @property
    def is_moe(self) -> bool:
        return self.mode in MOE_MODES

    @property
    def perception_group_size(self) -> int:
        return self.perception_experts if self.perception_experts is not None else self.experts // 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DiscriminatorSpec:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def with_mode(self, mode: str) -> DiscriminatorSpec:
        return replace(self, mode=mode)


def discriminator_layer_spec(spec: DiscriminatorSpec) -> ModuleSpec:
    """The policy's layer spec with the MLP slot made megatron's MoELayer (dense mode: unchanged)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    from megatron_prism.models.discriminator.router import PartAwareRouter
    from megatron_prism.models.qwen3vl.spec import qwen3vl_layer_spec

    layer = qwen3vl_layer_spec("local")
    if not spec.is_moe:
        return layer
    experts = ModuleSpec(
        module=SequentialMLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    layer.submodules.mlp = ModuleSpec(
        module=MoELayer, submodules=MoESubmodules(experts=experts, router=PartAwareRouter)
    )
    return layer


def moe_config_fields(spec: DiscriminatorSpec, ffn_hidden_size: int, ep: int, num_layers: int) -> dict[str, Any]:
    """TransformerConfig fields of the MoE (empty for the dense mode). ``spec.aux_loss_coeff`` is
    PRISM's (Hugging Face's) coefficient; megatron's per-layer one is converted from it
    (:func:`~megatron_prism.models.discriminator.load_balance.megatron_aux_loss_coeff`)."""
    from megatron_prism.models.discriminator.load_balance import megatron_aux_loss_coeff

    if not spec.is_moe:
        return {}
    return dict(
        num_moe_experts=spec.experts,
        moe_router_topk=spec.topk,
        moe_ffn_hidden_size=ffn_hidden_size,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=megatron_aux_loss_coeff(spec.aux_loss_coeff, num_layers, spec.topk),
        moe_input_jitter_eps=spec.router_jitter or None,
        moe_router_pre_softmax=False,  # softmax over the top-k: weights sum to 1, as Qwen3-MoE's norm_topk_prob
        moe_router_dtype="fp32",
        moe_grouped_gemm=False,
        moe_token_dispatcher_type=spec.dispatcher,
        expert_model_parallel_size=ep,
    )
