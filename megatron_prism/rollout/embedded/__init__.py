"""The embedded rollout engine (registered as ``embedded``): pure-torch batched Qwen3-VL
generation that runs on a CPU or one GPU, loading the HF-named weights the trainer streams."""

from megatron_prism.rollout.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedEngine"]
