"""Layer specs for the Qwen3-VL language model: which module fills each slot of a megatron layer.

Qwen3 decoder layer = RMSNorm -> GQA self-attention with per-head RMSNorm on q and k (QK-norm) and
rotary -> residual -> RMSNorm -> SwiGLU MLP -> residual. The DeepStack layer type adds visual
features after the layer (see :class:`DeepStackTransformerLayer`).

``local`` is pure torch (runs on CPU and GPU); ``te`` is Transformer Engine (GPU only, imported
lazily, used when TE is importable and a GPU is present).
"""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_prism.models.common.rmsnorm import RMSNorm
from megatron_prism.models.common.sdpa_attention import SDPACoreAttention


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
            hidden_states = hidden_states + context[:, :, level]
        return hidden_states, context


def qwen3vl_layer_spec(backend: str = "local") -> ModuleSpec:
    """The decoder-layer spec. ``backend`` is ``local`` (torch) or ``te`` (Transformer Engine)."""
    if backend == "te":
        return _te_layer_spec()
    if backend != "local":
        raise ValueError(f"unknown layer backend {backend!r}: expected 'local' or 'te'")
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


def _te_layer_spec() -> ModuleSpec:
    """Transformer Engine spec (GPU adapter): TE fuses the input norms into the following linear."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    spec.module = DeepStackTransformerLayer
    return spec


def final_norm_spec(backend: str = "local"):
    """The module for the block's final norm."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


__all__ = ["DeepStackTransformerLayer", "qwen3vl_layer_spec", "final_norm_spec"]
