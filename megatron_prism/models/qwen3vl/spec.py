"""Layer specs for the Qwen3-VL language model: which module fills each slot of a megatron layer.

Qwen3 decoder layer = RMSNorm -> GQA self-attention with per-head RMSNorm on q and k (QK-norm) and
rotary -> residual -> RMSNorm -> SwiGLU MLP -> residual. The DeepStack layer type adds visual
features after the layer (see :class:`DeepStackTransformerLayer`).

Two layer specs:

* ``local``: pure torch (:class:`RMSNorm`, megatron's tensor-parallel linears, SDPA attention);
  runs on CPU and GPU; ``model.attention_backend: sdpa``.
* ``te``: megatron-core's Transformer Engine spec (GPU only; ``transformer_engine`` is imported
  here, lazily, and nowhere else); ``model.attention_backend: te | flash | fused | unfused``.
  TE fuses each pre-norm into the linear after it, so two parameters are named differently
  (``conversion.mapping.spec_name`` translates, in one place).

:func:`resolve_attention_backend` turns the config key into (layer spec, megatron AttnBackend).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_prism.models.common.rmsnorm import RMSNorm
from megatron_prism.models.common.sdpa_attention import SDPACoreAttention

# megatron's names for the attention kernels: ours (SDPA, local spec) is "local"; the TE spec lets
# TE choose ("auto") unless a kernel family is pinned. megatron exports the pin as TE's switches
# (NVTE_FLASH_ATTN / NVTE_FUSED_ATTN / NVTE_UNFUSED_ATTN, read per call by TE 2.11's
# get_attention_backend, pytorch/attention/dot_product_attention/utils.py:407-412) when the model is
# built: megatron-core 0.16.1 models/common/language_module/language_module.py _set_attention_backend.
_MEGATRON_BACKEND = {"sdpa": AttnBackend.local, "te": AttnBackend.auto, "flash": AttnBackend.flash,
                     "fused": AttnBackend.fused, "unfused": AttnBackend.unfused}
ATTENTION_BACKENDS = ("auto", *_MEGATRON_BACKEND)
LAYER_SPECS = ("local", "te")


@dataclass(frozen=True)
class AttentionChoice:
    """What ``model.attention_backend`` resolved to."""

    requested: str
    resolved: str  # sdpa | te | flash | fused | unfused
    layer_spec: str  # local | te
    attn_backend: AttnBackend  # megatron TransformerConfig.attention_backend


def transformer_engine_status() -> str | None:
    """None when Transformer Engine can run here (it imports and a CUDA device exists), else why not."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        import transformer_engine.pytorch  # noqa: F401  (the GPU adapter's one import of TE)
    except Exception as exc:  # ImportError, or a TE build that does not match this torch/CUDA
        return f"transformer_engine does not import ({type(exc).__name__}: {exc})"
    return None


def resolve_attention_backend(requested: str, *, key: str = "model.attention_backend") -> AttentionChoice:
    """``auto`` is the TE spec where TE imports and CUDA is available, else the local (SDPA) one;
    ``te``/``flash``/``fused``/``unfused`` need TE and say so in one line when it is missing.
    (``local`` is accepted as the old name of ``sdpa``.)"""
    name = "sdpa" if requested == "local" else requested
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{key}={requested!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        name = "te" if transformer_engine_status() is None else "sdpa"
    elif name != "sdpa":
        why = transformer_engine_status()
        if why is not None:
            raise ValueError(
                f"{key}={requested!r} needs Transformer Engine, but {why}; on a CUDA machine install it "
                f"(pip install --no-build-isolation -e '.[te]'), or set {key} to sdpa (or auto)"
            )
    spec = "local" if name == "sdpa" else "te"
    return AttentionChoice(requested, name, spec, megatron_attn_backend(name))


def megatron_attn_backend(resolved: str) -> AttnBackend:
    """megatron's ``TransformerConfig.attention_backend`` for a resolved backend name."""
    return _MEGATRON_BACKEND[resolved]


class DeepStackTransformerLayer(TransformerLayer):
    """A megatron TransformerLayer that adds Qwen3-VL DeepStack features to its output.

    The features travel as the block's ``context`` tensor, shaped ``[s, b, levels, h]`` (zero away
    from image tokens). We use that channel because megatron threads ``context`` through every
    layer call *and* through its activation-recomputation checkpoints, so the addition is replayed
    correctly under full recompute; these layers have no cross-attention, so ``context`` is
    otherwise unused. Layer ``i`` (0-based, global) adds level ``i`` when ``i < levels``.
    """

    def forward(self, *args, **kwargs):
        hidden_states, context = super().forward(*args, **kwargs)
        level = self.layer_number - 1
        if context is not None and level < context.shape[2]:
            # under THD packing the hidden states are [t, 1, h] and so is each context level
            hidden_states = hidden_states + context[:, :, level]
        return hidden_states, context


def qwen3vl_layer_spec(backend: str = "local", *, num_experts: int | None = None) -> ModuleSpec:
    """The decoder-layer spec. ``backend`` is ``local`` (torch) or ``te`` (Transformer Engine).
    ``num_experts`` (TE only) asks megatron's TE spec for an MoE layer (the norm before the router
    then stays a separate ``pre_mlp_layernorm``); the local MoE layer is the discriminator's."""
    if backend == "te":
        return _te_layer_spec(num_experts)
    if backend != "local":
        raise ValueError(f"unknown layer spec {backend!r}: expected one of {', '.join(LAYER_SPECS)}")
    return ModuleSpec(
        module=DeepStackTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=RMSNorm,
                    k_layernorm=RMSNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _te_layer_spec(num_experts: int | None = None) -> ModuleSpec:
    """Transformer Engine spec (GPU adapter): megatron-core's own, with the DeepStack layer type.

    megatron 0.16.1 gpt_layer_specs.py get_gpt_layer_with_transformer_engine_spec: input_layernorm
    is IdentityOp and linear_qkv a TELayerNormColumnParallelLinear (the norm lives in it); the dense
    MLP's linear_fc1 is one too and pre_mlp_layernorm IdentityOp; an MoE layer keeps a TENorm
    pre_mlp_layernorm. The attention is TEDotProductAttention with a causal mask, which megatron
    turns into padding_causal for THD (packed) inputs (extensions/transformer_engine.py,
    TEDotProductAttention.forward)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, qk_layernorm=True)
    spec.module = DeepStackTransformerLayer
    return spec


def final_norm_spec(backend: str = "local"):
    """The module for the block's final norm."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


__all__ = ["ATTENTION_BACKENDS", "AttentionChoice", "DeepStackTransformerLayer",
           "final_norm_spec", "megatron_attn_backend", "qwen3vl_layer_spec", "resolve_attention_backend", "transformer_engine_status"]
