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

__all__ = ["ENGINES", "MEMORY_TAGS", "GenerationRequest", "GenerationResult", "RolloutEngine", "SamplingParams",
           "register_engine"]
