"""Where one rank's rollout engine goes and how much memory it takes (pure arithmetic, no GPU).

Every engine is bound to its leader's own local GPU (SGLang ``base_gpu_id``; vLLM's
``external_launcher`` takes ``LOCAL_RANK``), spans ``rollout.tp`` GPUs, and gets ports of its
own so that the engines of one node do not race for the same ones.

Memory: ``rollout.gpu_memory_fraction`` is a fraction of the GPU's *total* memory, whatever the
trainer already holds when the engine starts:

* vLLM 0.33 means the same (``vllm/v1/worker/utils.py:request_memory``: requested =
  ``total * gpu_memory_utilization``, refused when less than that is free), so it is passed on.
* SGLang 0.5.23 sizes its static pool from the memory free *before it loads the model*
  (``sglang/srt/mem_cache/kv_cache_configurator.py:_profile_available_bytes``: budget = free
  now - ``pre_model_load_free * (1 - mem_fraction_static)``), so the fraction is rescaled to
  ``fraction * total / free``.

Both refuse, in one line naming the key, when less than ``fraction * total`` is free.
"""

from __future__ import annotations

from dataclasses import dataclass

PORTS_PER_ENGINE = 20  # SGLang binds its HTTP port, a NCCL port and a few ZMQ ports around them


@dataclass(frozen=True)
class EnginePlacement:
    """One engine's place: its first GPU (on the leader's node), TP size, memory and ports."""

    gpu_id: int
    tp: int
    memory_fraction: float
    port: int
    nccl_port: int
    seed: int = 0


def place_engine(local_rank: int, ranks_per_node: int, rollout_tp: int, memory_fraction: float,
                 port_base: int, seed: int = 0) -> EnginePlacement:
    """The placement of the engine led by the rank with this ``local_rank``."""
    if not 0 < memory_fraction < 1:
        raise ValueError(f"rollout.gpu_memory_fraction must lie in (0, 1), got {memory_fraction}")
    if rollout_tp < 1 or local_rank % rollout_tp or local_rank + rollout_tp > max(ranks_per_node, 1):
        raise ValueError(f"rollout.tp {rollout_tp}: an engine led by local rank {local_rank} would span GPUs "
                         f"{local_rank}..{local_rank + rollout_tp - 1} of a node with {ranks_per_node}; rollout.tp "
                         "must divide the processes per node")
    port = port_base + PORTS_PER_ENGINE * (local_rank // rollout_tp)
    return EnginePlacement(gpu_id=local_rank, tp=rollout_tp, memory_fraction=memory_fraction, port=port,
                           nccl_port=port + PORTS_PER_ENGINE // 2, seed=seed)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_free_memory(fraction: float, free_bytes: int, total_bytes: int) -> None:
    """One line when the GPU has less than ``fraction * total`` free for the engine."""
    want = fraction * total_bytes
    if free_bytes < want:
        raise RuntimeError(f"rollout.gpu_memory_fraction={fraction} asks {_gib(int(want))} of the GPU's "
                           f"{_gib(total_bytes)} but only {_gib(free_bytes)} are free when the engine starts; lower "
                           "it, or free training memory first (parallel.* / model.recompute)")


def sglang_mem_fraction(fraction: float, free_bytes: int, total_bytes: int) -> float:
    """SGLang's ``mem_fraction_static`` that gives the engine ``fraction`` of the *total* memory
    when ``free_bytes`` are free before it loads (see the module docstring)."""
    check_free_memory(fraction, free_bytes, total_bytes)
    return min(fraction * total_bytes / free_bytes, 1.0)
