"""Qwen3-VL on megatron-core: layer spec, 3-D MRoPE, DeepStack, vision tower, build_policy."""
