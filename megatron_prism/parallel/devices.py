"""Where this process computes and where each process group communicates.

Two rules a GPU job lives by, kept in one place:

* **Compute device**: the model, its gradient buffers and optimizer state, and every batch once a
  runtime hands it to the model, live on :func:`compute_device` (the current CUDA device, or the
  host). Batches are built on the host and moved once, at that boundary (``training.runtime``).
* **Communication device**: NCCL communicates CUDA tensors only, gloo host tensors.
  :func:`comm_device` gives a group's device from its backend; a collective's tensors are put
  there (:func:`to_comm_device`) before it runs.

Host-side bookkeeping (token counts, "all ranks done?" flags, checkpoint success votes) does not
belong on the GPU at all: it goes over the **host groups** of :func:`host_group`, gloo groups
with the same members as the world / data-parallel / model-parallel / pipeline groups. They are also where a
rank waits while another generates rollouts: an NCCL collective would time out after the job's
600 s default while an 8B rollout can take longer; the host groups are created with
``HOST_GROUP_TIMEOUT_S`` (4 h) for that reason.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

#: How long a host-group collective may wait: a rank sits in one while another rank of its group
#: generates a rollout step (minutes to an hour at 8B), so the NCCL default (600 s) is too short.
HOST_GROUP_TIMEOUT_S = 4 * 3600

_HOST_GROUPS: dict[str, object] = {}
HOST_GROUP_KINDS = ("world", "data_parallel", "model_parallel", "pipeline")


def compute_device() -> torch.device:
    """The current CUDA device, or the host when there is none (``cpu_compat`` maps
    ``torch.cuda.current_device()`` to the host on a CPU machine)."""
    try:
        current = torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        return torch.device("cpu")
    return torch.device("cuda", current) if isinstance(current, int) else torch.device(current)


def model_dtype(name: str) -> str:
    """``model.dtype`` resolved: ``auto`` is ``bfloat16`` on a GPU (fp32 main grads), ``float32``
    on the host."""
    if name != "auto":
        return name
    return "bfloat16" if compute_device().type == "cuda" else "float32"


def comm_device(group=None) -> torch.device:
    """The device a collective over ``group`` takes its tensors on: CUDA for NCCL, host for gloo."""
    return compute_device() if dist.get_backend(group) == "nccl" else torch.device("cpu")


def to_comm_device(t: torch.Tensor, group=None) -> torch.Tensor:
    """``t`` on ``group``'s communication device (``t`` itself when it is already there)."""
    return t.to(comm_device(group), non_blocking=False)


def create_host_groups(timeout_s: int = HOST_GROUP_TIMEOUT_S) -> None:
    """Collective over the world: the gloo twins of the world, data-parallel, model-parallel and
    pipeline groups (megatron's parallel state must exist). Called by ``init_parallel``."""
    from megatron.core import parallel_state as ps

    _HOST_GROUPS.clear()
    timeout = datetime.timedelta(seconds=timeout_s)
    _HOST_GROUPS["world"] = dist.new_group(backend="gloo", timeout=timeout)
    for kind, group in (("data_parallel", ps.get_data_parallel_group()),
                        ("model_parallel", ps.get_model_parallel_group()),
                        ("pipeline", ps.get_pipeline_model_parallel_group())):
        mine = dist.get_process_group_ranks(group)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine, group=_HOST_GROUPS["world"])
        for ranks in sorted({tuple(r) for r in everyone}):
            # new_group is collective over the world: every rank creates every group, in one order
            g = dist.new_group(list(ranks), backend="gloo", timeout=timeout)
            if dist.get_rank() in ranks:
                _HOST_GROUPS[kind] = g


def host_group(kind: str = "world"):
    """The gloo group of ``kind`` (one of ``HOST_GROUP_KINDS``) for host-side
    bookkeeping and waits (see the module docstring)."""
    if kind not in HOST_GROUP_KINDS:
        raise ValueError(f"unknown host group {kind!r}; choose one of {', '.join(HOST_GROUP_KINDS)}")
    if kind not in _HOST_GROUPS:
        raise RuntimeError("host groups do not exist yet: call megatron_prism.parallel.init_parallel first")
    return _HOST_GROUPS[kind]


def host_group_handles() -> list:
    """Every host group this rank belongs to (the device audit treats them as gloo)."""
    return list(_HOST_GROUPS.values())


def clear_host_groups() -> None:
    """Forget the host groups (their process groups are destroyed with the world's)."""
    _HOST_GROUPS.clear()
