"""Which ranks share one rollout engine, and the gloo group they wait on while it generates.

A rollout engine serves an *engine group* of ranks: with ``rollout.tp == 1`` that is one
model-parallel group (its TP rank 0 of pipeline stage 0 drives a one-GPU engine, the other
ranks hold identical prompts and wait); with ``rollout.tp > 1`` it is ``rollout.tp``
consecutive ranks (whole model-parallel groups, validated), whose GPUs the engine's tensor
parallelism spans. The group's first rank leads: it receives the exported weights and the
prompts of the group and hands every rank its results.

Why gloo: while the leader generates (minutes for 16 x 8k-token samples) the other ranks sit in
the group's collective. An NCCL collective there would hit the process group's watchdog
timeout (600 s by default) and kill the job; a gloo group waits on the CPU with its own
timeout, ``rollout.wait_timeout_s``, set from the config because a generation round's length
depends on ``rollout.n`` x ``rollout.max_new_tokens``, not on the training step.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_prism.parallel import cpu_compat

_GROUPS: dict[tuple, tuple[object, tuple[int, ...]]] = {}


def engine_groups(world_size: int, rollout_tp: int, model_parallel_groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """The partition of ``range(world_size)`` into engine groups (see the module docstring).

    ``model_parallel_groups``: every model-parallel group's ranks. With ``rollout_tp > 1`` the
    groups are consecutive blocks, each of which must hold whole model-parallel groups."""
    if rollout_tp < 1 or world_size % rollout_tp:
        raise ValueError(f"rollout.tp {rollout_tp} does not divide the {world_size} ranks")
    mp = sorted(sorted(g) for g in {tuple(sorted(g)) for g in model_parallel_groups})
    if rollout_tp == 1:
        return [list(g) for g in mp]
    blocks = [list(range(s, s + rollout_tp)) for s in range(0, world_size, rollout_tp)]
    for g in mp:
        if len({r // rollout_tp for r in g}) != 1:
            raise ValueError(f"rollout.tp {rollout_tp}: model-parallel group {g} straddles two engines; rollout.tp "
                             "must be a multiple of parallel.tp with parallel.pp 1")
    return blocks


def rollout_wait_group(rollout_tp: int, timeout_s: float) -> tuple[object | None, tuple[int, ...]]:
    """This rank's engine group as a gloo process group, and its ranks (leader first).

    Collective on first use (every rank must call it with the same arguments); cached after.
    ``(None, (0,))`` in a one-process run."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None, (0,)
    key = (rollout_tp, float(timeout_s))
    if key not in _GROUPS:
        from megatron.core import parallel_state as ps

        world = dist.get_world_size()
        mine = dist.get_process_group_ranks(ps.get_model_parallel_group())
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        groups = engine_groups(world, rollout_tp, everyone)
        timeout = datetime.timedelta(seconds=float(timeout_s))
        group, _ = dist.new_subgroups_by_enumeration(groups, timeout=timeout, backend="gloo")
        rank = dist.get_rank()
        _GROUPS[key] = (group, tuple(next(g for g in groups if rank in g)))
    return _GROUPS[key]


def forget_rollout_wait_groups() -> None:
    """Drop the cached groups (after ``destroy_process_group``, e.g. between tests)."""
    _GROUPS.clear()


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def ranks_per_node() -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def engine_device() -> torch.device:
    """Where this rank's share of a rollout engine lives: its own local GPU, or the CPU."""
    if cpu_compat.on_cpu():
        return torch.device("cpu")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())
