"""Tiny random Qwen3-VL checkpoints, built locally from a config (no download).

They are what the embedded default and the test-suite run on: the same architecture as
Qwen3-VL-4B/8B (GQA, QK-norm, interleaved MRoPE, DeepStack, the ViT tower), a few MB in size.
Three shapes are provided so tests catch shape assumptions: ``a`` (untied, 4 layers, 2 DeepStack
levels), ``b`` (tied embeddings, wider heads, 1 DeepStack level, so 4 layers split into pp=2 x vpp=2
chunks) and ``c`` (``a`` with a prime vocabulary of 397, padded under tensor parallelism).
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENS = {"image_token_id": 250, "video_token_id": 251, "vision_start_token_id": 252, "vision_end_token_id": 253}

_VARIANTS = {
    "a": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                    temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                    num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        tie=False,
    ),
    "b": dict(
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=24, vocab_size=320,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                   "mrope_section": [4, 4, 4], "mrope_interleaved": True}),
        vision=dict(depth=2, hidden_size=48, intermediate_size=96, num_heads=3, patch_size=4,
                    temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=96,
                    num_position_embeddings=36, deepstack_visual_indexes=[1]),
        tie=True,
    ),
}
# ``c``: shape ``a`` with a vocabulary no tensor-parallel size > 1 divides (397 is prime), so the
# embedding and output layer are padded on the megatron side (conversion.mapping.padded_vocab_size).
_VARIANTS["c"] = dict(_VARIANTS["a"], text=dict(_VARIANTS["a"]["text"], vocab_size=397))


def tiny_qwen3vl_config(variant: str = "a"):
    """A ``Qwen3VLConfig`` of the named tiny shape."""
    from transformers import Qwen3VLConfig

    if variant not in _VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose from {sorted(_VARIANTS)}")
    v = _VARIANTS[variant]
    text = dict(v["text"], rms_norm_eps=1e-6, max_position_embeddings=4096, hidden_act="silu")
    return Qwen3VLConfig(text_config=text, vision_config=dict(v["vision"]),
                         tie_word_embeddings=v["tie"], **TOKENS)


def save_random_qwen3vl(out_dir: str | Path, variant: str = "a", seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write a randomly initialised tiny Qwen3-VL as a HF directory; returns its path.

    Norm weights are randomised too (HF initialises them to one), so a test that swapped two of
    them would notice.
    """
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_qwen3vl_config(variant)).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm1.weight") \
                    or name.endswith("norm2.weight"):
                param.uniform_(0.5, 1.5)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


#: The embedded pipeline's model: the shape of variant "a" with a vision tower whose 16-pixel
#: patches suit the synthetic task's 64x64 images (4x4 patches, 4 LM tokens after the 2x2 merge).
PIPELINE_SHAPE = dict(
    text=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                num_position_embeddings=16, deepstack_visual_indexes=[0]),
)


#: A model real GPU engines accept: head_dim 64 (the smallest their attention kernels take), bf16,
#: KV heads that split over TP 2, the vision tower's 16-pixel patches (Qwen3-VL's own).
GPU_ENGINE_SHAPE = dict(
    text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [16, 8, 8], "mrope_interleaved": True}),
    vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=256,
                num_position_embeddings=64, deepstack_visual_indexes=[0]),
)


def preprocessor_config(vision: dict, min_pixels: int = 64 * 32 * 32, max_pixels: int = 256 * 32 * 32) -> dict:
    """A Qwen3-VL ``preprocessor_config.json`` for a vision tower (SGLang and vLLM build the HF
    processor of a multimodal model from it)."""
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
            "patch_size": vision["patch_size"], "merge_size": vision["spatial_merge_size"],
            "temporal_patch_size": vision["temporal_patch_size"],
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_resize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True}


def save_tiny_for_tokenizer(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, *,
                            shape: dict = PIPELINE_SHAPE, dtype: torch.dtype = torch.float32,
                            with_preprocessor: bool = False) -> Path:
    """A tiny random Qwen3-VL sized to a tokenizer (vocab rounded up to a multiple of 64, so any
    TP up to 64 divides it), with the tokenizer's vision-token ids and its files copied in, so the
    directory is a complete model (weights + config + tokenizer) like a released checkpoint.
    ``shape``: e.g. :data:`GPU_ENGINE_SHAPE`; ``with_preprocessor`` adds a preprocessor_config.json."""
    import shutil

    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids = {key: tok.convert_tokens_to_ids(tok_name) for key, tok_name in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vocab = -(-len(tok) // 64) * 64
    text = dict(shape["text"], vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=4096,
                hidden_act="silu", bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id)
    config = Qwen3VLConfig(text_config=text, vision_config=dict(shape["vision"]),
                           tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    if with_preprocessor:
        import json

        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(shape["vision"]), indent=2) + "\n")
    return out
