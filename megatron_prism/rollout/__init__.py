"""Rollout: one engine interface (``interface``), the embedded engine, GPU adapters, weight sync."""

from megatron_prism.rollout.interface import (
    ENGINES,
    MEMORY_TAGS,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    SamplingParams,
    register_engine,
)

# Importing the engine modules registers them by name ("embedded", "sglang", "vllm"); the GPU
# adapters import their packages only when an engine is constructed.
from megatron_prism.rollout import embedded, sglang_engine, vllm_engine  # noqa: E402,F401

__all__ = ["ENGINES", "MEMORY_TAGS", "GenerationRequest", "GenerationResult", "RolloutEngine", "SamplingParams",
           "register_engine"]
