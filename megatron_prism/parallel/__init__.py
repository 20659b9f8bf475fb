"""Process groups, megatron parallel state, and the CPU-compatibility shim (cpu_compat)."""

from megatron_prism.parallel.state import ParallelLayout, current_layout, init_parallel

__all__ = ["ParallelLayout", "current_layout", "init_parallel"]
