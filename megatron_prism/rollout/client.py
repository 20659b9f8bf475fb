"""The stages' handle on the rollout engine: placement, the colocated lifecycle, and sharing the
engine's work over its group of ranks.

Lifecycle of every engine (embedded, SGLang, vLLM), in this order:

1. **start** on the group's first use, from the config and tokenizer directory of the run's
   checkpoint with *dummy* weights (no HF weights on disk needed), bound to its leader's own GPU,
   sized as ``rollout.gpu_memory_fraction`` of the GPU's total memory (``rollout.placement``);
2. **sync** before a generation: resume ``weights`` -> stream the policy's weights -> resume
   ``kv_cache`` (``weight_sync.sync_weights``);
3. **generate** the group's prompts;
4. **release** all of the engine's memory right after, so training has the GPU again. A later
   ``generate`` with no ``sync`` in between (a frozen policy, a refill round) syncs the last
   runtime again first.

The group (``parallel.rollout_groups``) shares one engine: every rank calls :meth:`generate` with
its model-parallel group's prompts; they are gathered to the leader over a gloo group (the
waiting ranks block there, on the CPU, for up to ``rollout.wait_timeout_s``; an NCCL collective
would hit its 600 s watchdog), generated once per model-parallel group, and scattered back, so
all ranks of a model-parallel group continue with the same responses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_prism.parallel.rollout_groups import engine_device, local_rank, ranks_per_node, rollout_wait_group
from megatron_prism.rollout.interface import ENGINES, GenerationRequest, GenerationResult, RolloutEngine, SamplingParams
from megatron_prism.rollout.placement import EnginePlacement, place_engine
from megatron_prism.rollout.weight_sync import is_export_destination, sync_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """What the client needs of ``rollout.*`` (kept apart from the config schema so that
    ``rollout`` does not import ``config``)."""

    engine: str = "embedded"
    gpu_memory_fraction: float = 0.5
    tp: int = 1
    port_base: int = 30000
    wait_timeout_s: float = 3600.0
    seed: int = 0
    release_after_generate: bool = True


def _mp_key() -> int:
    """The first global rank of this rank's model-parallel group (names the group's prompts)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    from megatron.core import parallel_state as ps

    return min(dist.get_process_group_ranks(ps.get_model_parallel_group()))


class RolloutClient:
    """One engine per engine group, driven through the lifecycle in the module docstring."""

    def __init__(self, settings: EngineSettings, config_dir: str | Path) -> None:
        ENGINES.get(settings.engine)  # an unknown name fails here, in one line
        self.settings = settings
        self.config_dir = Path(config_dir)
        self.engine: RolloutEngine | None = None
        self.version = 0
        self.last_sync: dict[str, float] = {}
        self._runtime = None
        self._released = False
        self._group, self._ranks = None, (0,)
        self._grouped = False
        self._started = False

    # ---- who does what ----------------------------------------------------------------------

    @property
    def engine_class(self) -> type[RolloutEngine]:
        return ENGINES.get(self.settings.engine)

    def _groups(self) -> None:
        if not self._grouped:
            self._group, self._ranks = rollout_wait_group(self.settings.tp, self.settings.wait_timeout_s)
            self._grouped = True

    def _rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def leader(self) -> int:
        self._groups()
        return self._ranks[0]

    def is_member(self) -> bool:
        """Holds a share of the engine: the leader, or every rank of an SPMD engine (vLLM)."""
        return self._rank() == self.leader or self.engine_class.spmd

    def is_driver(self) -> bool:
        """Calls the engine's generate: the leader, and an SPMD engine's other TP ranks."""
        offset = self._ranks.index(self._rank()) if self._rank() in self._ranks else 0
        return offset == 0 or (self.engine_class.spmd and offset < self.settings.tp)

    def placement(self) -> EnginePlacement:
        s = self.settings
        if self.engine_class.spmd:  # each rank places its own shard; the TP group is vLLM's own
            return place_engine(local_rank() - local_rank() % s.tp, ranks_per_node(), s.tp,
                                s.gpu_memory_fraction, s.port_base, s.seed)
        return place_engine(local_rank(), ranks_per_node(), s.tp, s.gpu_memory_fraction, s.port_base, s.seed)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start this rank's engine (members only) with dummy weights, then release its memory
        until the first sync. Call it on every rank; idempotent."""
        self._groups()
        if self._started:
            return
        self._started = True
        self._released = True  # on every rank, so that all ranks take the same sync decisions
        if not self.is_member():
            return
        # Building a model draws random initial weights (then replaced): keep that off the
        # training RNG, or a resumed run, which starts its engine at another point, would draw
        # different dropout masks afterwards.
        with torch.random.fork_rng(devices=[]):
            self.engine = self.engine_class.launch(self.config_dir, self.placement(), engine_device())
        self.engine.release_memory()

    def sync(self, runtime) -> dict[str, float]:
        """Resume weights -> stream the policy's weights -> resume the KV cache (collective over
        the model-parallel group; every rank calls it)."""
        self.start()
        self._runtime = runtime
        self.version += 1
        spmd = self.engine_class.spmd
        self.last_sync = sync_weights(self.engine if self.engine is not None else None, runtime.chunks,
                                      runtime.hf_config, version=self.version, dst_rank_only=not spmd)
        self._released = False
        return self.last_sync

    def release(self) -> None:
        """Give all of the engine's memory back (weights, KV cache and what else it holds)."""
        if self.engine is not None and not self._released:
            self.engine.release_memory()
        self._released = True

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationResult]:
        """This model-parallel group's results (every rank of the engine group calls it)."""
        if self._released or not self._started:
            if self._runtime is None:
                raise RuntimeError("RolloutClient.generate before the first sync(runtime)")
            self.sync(self._runtime)
        self._groups()
        work = [(_mp_key(), list(requests) if is_export_destination() else None, sampling)]
        if self._group is not None:
            gathered: list | None = [None] * len(self._ranks) if self._rank() == self.leader else None
            dist.gather_object(work[0], gathered, dst=self.leader, group=self._group)
            box = [gathered]
            dist.broadcast_object_list(box, src=self.leader, group=self._group)  # SPMD drivers need the same work
            work = box[0]
        jobs = [(key, reqs, sp) for key, reqs, sp in work if reqs is not None]
        answers: dict[int, Any] = {}
        if self.is_driver() and self.engine is not None:
            try:
                for key, reqs, sp in jobs:
                    answers[key] = self.engine.generate(reqs, sp)
            except Exception as err:  # noqa: BLE001 -- the waiting ranks must learn of it, not time out
                answers = {key: RuntimeError(f"rollout engine on rank {self.leader}: {err}") for key, _, _ in jobs}
                if self._group is None:
                    raise
        if self._group is not None:
            mine: list = [None]
            out = [answers.get(key) for key, _, _ in work] if self._rank() == self.leader else None
            dist.scatter_object_list(mine, out, src=self.leader, group=self._group)
            result = mine[0]
        else:
            result = answers[work[0][0]]
        if self.settings.release_after_generate:
            self.release()
        if isinstance(result, Exception):
            raise result
        return result

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self.engine = None
