"""Torch distributed + megatron-core parallel state, set up the same way on CPU and GPU.

``init_parallel`` works in three situations: inside ``torchrun`` (RANK/WORLD_SIZE set), in a plain
Python process (a one-process group is created on a free localhost port), and when the caller
already set everything up (then it only checks that the layout matches).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_prism.parallel import cpu_compat, devices


@dataclass(frozen=True)
class ParallelLayout:
    """The model-parallel layout of this process and where it sits in it."""

    tp: int
    pp: int
    vpp: int | None
    ep: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    world_size: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(timeout_s: int) -> None:
    import datetime

    backend = cpu_compat.process_group_backend()
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if not cpu_compat.on_cpu():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        # A plain Python process: a one-rank group so that megatron's parallel state exists.
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )


def current_layout() -> ParallelLayout:
    """The layout megatron's parallel state holds now (it must be initialised)."""
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        world_size=dist.get_world_size(),
    )


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    ep: int = 1,
    seed: int = 1234,
    timeout_s: int = 600,
) -> ParallelLayout:
    """Make sure torch.distributed and megatron's parallel state exist with this layout.

    Re-initialises megatron's model-parallel groups when they exist with another layout (useful in
    tests and notebooks); the world size must be a multiple of ``tp * pp``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    cpu_compat.install()
    if not dist.is_initialized():
        _init_process_group(timeout_s)
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"world size {world} is not a multiple of tp*pp = {tp}*{pp}; launch "
            f"{tp * pp}*k processes (torchrun --nproc-per-node) or choose a smaller layout"
        )
    if ps.model_parallel_is_initialized():
        now = current_layout()
        if (now.tp, now.pp, now.vpp, now.ep) == (tp, pp, vpp, ep):
            if not devices.host_group_handles():
                devices.create_host_groups()
            return now
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    devices.create_host_groups()
    return current_layout()


def shutdown_parallel() -> None:
    """Tear megatron's groups and the process group down before the interpreter exits: a gloo
    group left alive has its worker threads destroyed during interpreter teardown, which aborts
    the process now and then ("terminate called without an active exception", exit -6) after
    all the work is done."""
    if not dist.is_initialized():
        return
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    devices.clear_host_groups()
    dist.destroy_process_group()
