"""From a Hugging Face Qwen3-VL config to megatron-core's TransformerConfig.

Every field that changes the function computed comes from the HF config; the parallel layout,
dtype and recomputation come from the caller. Layouts that cannot be split evenly are refused
here, with the number that does not divide, before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron_prism.models.errors import CheckpointError
from megatron_prism.parallel import cpu_compat

SUPPORTED_MODEL_TYPES = ("qwen3_vl",)


@dataclass(frozen=True)
class LayoutOptions:
    """How the model is split and computed (the things the HF config does not say)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    dtype: torch.dtype = torch.float32
    recompute: str = "none"  # none | selective | full
    backend: str = "local"  # layer spec: local | te
    attention: str = "sdpa"  # resolved model.attention_backend: sdpa | te | flash | fused | unfused


def read_hf_config(hf_dir: str | Path):
    """Load and check ``config.json`` of a Qwen3-VL directory; returns a ``Qwen3VLConfig``."""
    from transformers import Qwen3VLConfig

    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json, so {Path(hf_dir)} is not a Hugging Face Qwen3-VL directory; "
                              "point the setting that named it (model.hf_dir, --checkpoint, --hf-dir) at one")
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-download or re-export the config") from exc
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type is {model_type!r}, but megatron_prism converts Qwen3-VL "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}) only; use a Qwen3-VL checkpoint"
        )
    try:
        return Qwen3VLConfig.from_dict(raw)
    except Exception as exc:  # transformers validates field types strictly
        raise CheckpointError(f"{path}: not a valid Qwen3-VL config: {exc}") from exc


def check_layout(hf_config, tp: int, pp: int, vpp: int | None = None) -> None:
    """Refuse a TP/PP layout that does not divide the model evenly (the vocabulary is padded to a
    multiple of TP instead, as megatron does: conversion.mapping.padded_vocab_size)."""
    tc = hf_config.text_config
    checks = [
        ("num_attention_heads", tc.num_attention_heads, tp, "tensor-parallel size"),
        ("num_key_value_heads", tc.num_key_value_heads, tp, "tensor-parallel size"),
        ("intermediate_size", tc.intermediate_size, tp, "tensor-parallel size"),
        ("num_hidden_layers", tc.num_hidden_layers, pp * (vpp or 1), "pipeline stages x virtual stages"),
    ]
    for name, value, size, what in checks:
        if size < 1 or value % size != 0:
            raise CheckpointError(
                f"{what} {size} does not divide {name} = {value}; choose a size that divides it"
            )
    levels = len(hf_config.vision_config.deepstack_visual_indexes)
    first_stage_layers = tc.num_hidden_layers // (pp * (vpp or 1))
    if levels > first_stage_layers:
        raise CheckpointError(
            f"DeepStack adds vision features after the first {levels} LM layers, but the first "
            f"pipeline stage holds only {first_stage_layers}; use fewer pipeline stages"
        )


def mrope_settings(hf_config) -> tuple[float, list[int]]:
    """(rotary base, mrope_section) of the text model, refusing rope variants we do not implement."""
    rope = dict(hf_config.text_config.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise CheckpointError(f"rope_type {rope_type!r} is not supported (Qwen3-VL uses 'default')")
    if not rope.get("mrope_interleaved", True):
        raise CheckpointError("mrope_interleaved=False (Qwen2-VL style) is not Qwen3-VL; not supported")
    section = list(rope.get("mrope_section", [24, 20, 20]))
    return float(rope["rope_theta"]), section


def transformer_config(hf_config, layout: LayoutOptions):
    """The megatron TransformerConfig of the Qwen3-VL language model."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    tc = hf_config.text_config
    if tc.hidden_act != "silu":
        raise CheckpointError(f"hidden_act {tc.hidden_act!r} is not supported (Qwen3-VL uses silu)")
    rotary_base, section = mrope_settings(hf_config)
    recompute: dict[str, Any] = {}
    if layout.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif layout.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif layout.recompute != "none":
        raise ValueError(f"recompute must be none|selective|full, got {layout.recompute!r}")
    from megatron_prism.models.qwen3vl.spec import megatron_attn_backend

    if (layout.backend == "te") != (layout.attention != "sdpa"):
        raise ValueError(f"attention {layout.attention!r} does not run in the {layout.backend!r} layer spec")
    return TransformerConfig(
        num_layers=tc.num_hidden_layers,
        hidden_size=tc.hidden_size,
        ffn_hidden_size=tc.intermediate_size,
        num_attention_heads=tc.num_attention_heads,
        num_query_groups=tc.num_key_value_heads,
        kv_channels=tc.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=tc.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(tc.attention_bias),
        hidden_dropout=0.0,
        attention_dropout=float(tc.attention_dropout),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        sequence_parallel=layout.sequence_parallel and layout.tp > 1,
        params_dtype=layout.dtype,
        pipeline_dtype=layout.dtype,
        bf16=layout.dtype == torch.bfloat16,
        fp16=layout.dtype == torch.float16,
        variable_seq_lengths=True,
        attention_backend=megatron_attn_backend(layout.attention),
        # Our losses arrive already normalised by the *global* token/sequence counts
        # (algorithms.aggregation), so megatron must neither divide them by the number of
        # micro-batches nor average gradients over data-parallel ranks: it sums both.
        calculate_per_token_loss=True,
        moe_token_dispatcher_type="alltoall",  # the only dispatcher megatron allows with variable lengths
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        mrope_section=section,
        rotary_interleaved=False,
        **recompute,
        **cpu_compat.transformer_config_overrides(),
    )
