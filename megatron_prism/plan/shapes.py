"""Model shapes for the planner (``prism plan``): read from a Qwen3-VL ``config.json``, or a named
preset when no HF directory is at hand (a login node before the download), and exact parameter
counts derived from them.

Deliberately torch-free: ``prism plan`` runs on a login node in well under a second. The counts
follow the modules :func:`megatron_prism.models.build_policy` builds (megatron-core GPTModel for
the language model, transformers' vision tower); ``tests/plan`` checks them against a built model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PlanError(ValueError):
    """A planner input the user must fix (message names the file/flag and the fix)."""


@dataclass(frozen=True)
class TextShape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    num_experts: int = 1  # >1: an MoE model (the discriminator); every layer's MLP is replicated per expert


@dataclass(frozen=True)
class VisionShape:
    depth: int
    hidden: int
    ffn: int
    heads: int
    patch: int
    temporal_patch: int
    merge: int
    out_hidden: int
    num_positions: int
    deepstack: int
    in_channels: int = 3


@dataclass(frozen=True)
class ModelShape:
    name: str
    text: TextShape
    vision: VisionShape

    # --- parameter counts (exact for the modules build_policy creates) ---------------------------
    def layer_matrix_params(self) -> int:
        """Per decoder layer, the TP-sharded weights (QKV, output projection, MLP, router)."""
        t = self.text
        attn = t.hidden * (t.heads + 2 * t.kv_heads) * t.head_dim + t.heads * t.head_dim * t.hidden
        mlp = 3 * t.hidden * t.ffn * t.num_experts
        router = t.hidden * t.num_experts if t.num_experts > 1 else 0
        return attn + mlp + router

    def layer_replicated_params(self) -> int:
        """Per decoder layer, the weights every TP rank holds whole: two RMSNorms and QK-norm."""
        return 2 * self.text.hidden + 2 * self.text.head_dim

    def layer_params(self) -> int:
        return self.layer_matrix_params() + self.layer_replicated_params()

    def expert_params(self) -> int:
        """Per layer, the MLP weights that expert parallelism divides."""
        return 3 * self.text.hidden * self.text.ffn * self.text.num_experts

    def embedding_params(self) -> int:
        return self.text.vocab * self.text.hidden

    def vision_params(self) -> int:
        v = self.vision
        block = (4 * v.hidden  # norm1, norm2 (LayerNorm: weight + bias)
                 + v.hidden * 3 * v.hidden + 3 * v.hidden + v.hidden * v.hidden + v.hidden  # qkv, proj
                 + v.hidden * v.ffn + v.ffn + v.ffn * v.hidden + v.hidden)  # linear_fc1, linear_fc2
        ctx = v.hidden * v.merge ** 2
        merger_linears = ctx * ctx + ctx + ctx * v.out_hidden + v.out_hidden
        mergers = (2 * v.hidden + merger_linears) + v.deepstack * (2 * ctx + merger_linears)
        patch = v.in_channels * v.temporal_patch * v.patch ** 2 * v.hidden + v.hidden
        return v.depth * block + mergers + patch + v.num_positions * v.hidden

    def total_params(self) -> int:
        t = self.text
        output = 0 if t.tied else self.embedding_params()
        return (self.vision_params() + self.embedding_params() + output + t.layers * self.layer_params()
                + t.hidden)  # + final norm

    def active_text_params(self, top_k: int = 1) -> int:
        """Language-model parameters one token passes through (for FLOPs): top_k experts per layer."""
        t = self.text
        per_layer = self.layer_params() - self.expert_params() + 3 * t.hidden * t.ffn * (top_k if t.num_experts > 1 else 1)
        return t.layers * per_layer + 2 * self.embedding_params()

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        t = self.text
        return 2 * t.layers * t.kv_heads * t.head_dim * dtype_bytes


def shape_from_hf_config(raw: dict[str, Any], name: str, num_experts: int = 1) -> ModelShape:
    """A shape from the parsed ``config.json`` of a Qwen3-VL (or Qwen3-VL-MoE) directory."""
    try:
        tc, vc = raw["text_config"], raw["vision_config"]
        experts = int(tc.get("num_experts", num_experts) or num_experts)
        text = TextShape(
            hidden=tc["hidden_size"], ffn=tc.get("moe_intermediate_size", tc["intermediate_size"]) if experts > 1
            else tc["intermediate_size"], layers=tc["num_hidden_layers"], heads=tc["num_attention_heads"],
            kv_heads=tc["num_key_value_heads"], head_dim=tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"],
            vocab=tc["vocab_size"], tied=bool(raw.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
            num_experts=experts)
        vision = VisionShape(
            depth=vc["depth"], hidden=vc["hidden_size"], ffn=vc["intermediate_size"], heads=vc["num_heads"],
            patch=vc["patch_size"], temporal_patch=vc["temporal_patch_size"], merge=vc["spatial_merge_size"],
            out_hidden=vc["out_hidden_size"], num_positions=vc["num_position_embeddings"],
            deepstack=len(vc.get("deepstack_visual_indexes", [])), in_channels=vc.get("in_channels", 3))
    except (KeyError, TypeError) as exc:
        raise PlanError(f"{name}: not a Qwen3-VL config.json (missing {exc}); point model.hf_dir at a Qwen3-VL "
                        f"directory or pass --preset") from None
    return ModelShape(name, text, vision)


# Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json (Hugging Face, Oct 2025); used only when no
# config.json is readable (e.g. planning on a login node before the weights are downloaded).
_VISION_LARGE = VisionShape(depth=27, hidden=1152, ffn=4304, heads=16, patch=16, temporal_patch=2, merge=2,
                            out_hidden=4096, num_positions=2304, deepstack=3)
_VISION_SMALL = VisionShape(depth=24, hidden=1024, ffn=4096, heads=16, patch=16, temporal_patch=2, merge=2,
                            out_hidden=2560, num_positions=2304, deepstack=3)
PRESETS: dict[str, ModelShape] = {
    "qwen3vl-8b": ModelShape("qwen3vl-8b", TextShape(4096, 12288, 36, 32, 8, 128, 151936, tied=False), _VISION_LARGE),
    "qwen3vl-4b": ModelShape("qwen3vl-4b", TextShape(2560, 9728, 36, 32, 8, 128, 151936, tied=True), _VISION_SMALL),
    "qwen3vl-2b": ModelShape("qwen3vl-2b", TextShape(2048, 6144, 28, 16, 8, 128, 151936, tied=True),
                             VisionShape(24, 1024, 4096, 16, 16, 2, 2, 2048, 2304, 3)),
}
# PRISM's discriminator: Qwen3-VL-2B sparse-upcycled to 4 experts, top-2 (PRISM
# scripts/train/moe_warmup/create_moe.sh: NUM_EXPERTS=4, NUM_EXPERTS_PER_TOK=2).
PRESETS["qwen3vl-2b-moe4"] = ModelShape(
    "qwen3vl-2b-moe4", TextShape(2048, 6144, 28, 16, 8, 128, 151936, tied=True, num_experts=4),
    PRESETS["qwen3vl-2b"].vision)


def _preset_for_path(path: str) -> str | None:
    m = re.search(r"qwen3[-_]?vl[-_]?(\d+)b", Path(path).name.lower())
    return f"qwen3vl-{m.group(1)}b" if m and f"qwen3vl-{m.group(1)}b" in PRESETS else None


def resolve_policy_shape(hf_dir: str | None, megatron_dir: str | None, preset: str | None) -> ModelShape:
    """The policy's shape: ``--preset``, else the config.json of ``model.hf_dir`` (or of
    ``model.megatron_dir/hf``), else a preset named by the directory, else the built-in tiny model."""
    if preset:
        if preset not in PRESETS:
            raise PlanError(f"--preset {preset!r} is unknown; choose from {', '.join(sorted(PRESETS))}")
        return PRESETS[preset]
    for key, base in (("model.hf_dir", hf_dir), ("model.megatron_dir", megatron_dir and str(Path(megatron_dir) / "hf"))):
        if not base:
            continue
        cfg = Path(base) / "config.json"
        if cfg.is_file():
            try:
                return shape_from_hf_config(json.loads(cfg.read_text()), str(cfg))
            except json.JSONDecodeError as exc:
                raise PlanError(f"{cfg}: not valid JSON ({exc})") from None
        guessed = _preset_for_path(hf_dir or megatron_dir or "")
        if guessed:
            return PRESETS[guessed]
        raise PlanError(f"{key}={base}: no config.json there and its name matches no preset; download the "
                        f"model there or pass --preset ({', '.join(sorted(PRESETS))})")
    return tiny_shape()


def tiny_shape(vocab: int = 320) -> ModelShape:
    """The built-in tiny pipeline model (``models/qwen3vl/tiny.py``); its vocabulary follows the
    synthetic tokenizer (a multiple of 64), which only changes the count by a few thousand."""
    from megatron_prism.models.qwen3vl.tiny import PIPELINE_SHAPE  # imports torch: tiny runs only

    t, v = PIPELINE_SHAPE["text"], PIPELINE_SHAPE["vision"]
    raw = {"text_config": dict(t, vocab_size=vocab), "vision_config": v, "tie_word_embeddings": False}
    return shape_from_hf_config(raw, "built-in tiny model")
