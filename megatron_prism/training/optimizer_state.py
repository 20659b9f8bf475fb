"""The parameter state of megatron's distributed optimizer, saved and restored exactly.

Why: ``DistributedOptimizer.state_dict()`` (megatron-core 0.16.1) holds only the step counts and
hyper-parameters; each rank's shard of the fp32 main parameters and Adam's ``exp_avg`` /
``exp_avg_sq`` live outside it, and ``load_state_dict`` refills them with ``torch.empty`` "to be
overwritten by load_parameter_state()". A resume that restores only the state dict continues from
garbage moments. Here each distributed optimizer's parameter state is gathered to data-parallel
rank 0 (``get_parameter_state_dp_zero``, gloo), written once to a temporary file and renamed, and
on load read with ``torch.load(weights_only=True)`` and scattered back
(``load_parameter_state_from_dp_zero``). The gathered form is in model space, so it reloads at
another data-parallel size.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


def _distributed_parts(optimizer) -> list:
    """The distributed optimizers inside megatron's (possibly chained) optimizer."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if hasattr(p, "get_parameter_state_dp_zero")]


def has_parameter_state(optimizer) -> bool:
    """True when ``optimizer`` keeps state outside its ``state_dict`` (a distributed optimizer)."""
    return bool(_distributed_parts(optimizer))


def save_parameter_state(optimizer, path: str | Path) -> bool:
    """Gather every distributed optimizer's parameter state and write it to ``path`` from
    data-parallel rank 0 (a collective: every rank of the data-parallel group calls it). Returns
    True on the rank that wrote the file."""
    states, writer = [], False
    for part in _distributed_parts(optimizer):
        state = part.get_parameter_state_dp_zero()
        if part.data_parallel_group.rank() == 0:
            writer = True
        states.append(state)
    if writer:
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(states, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return writer


def load_parameter_state(optimizer, path: str | Path) -> None:
    """Inverse of :func:`save_parameter_state`: data-parallel rank 0 reads ``path`` (weights only)
    and every distributed optimizer scatters its part; call after ``optimizer.load_state_dict``."""
    parts = _distributed_parts(optimizer)
    states = None
    if parts and parts[0].data_parallel_group.rank() == 0:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the distributed optimizer's parameter state is missing; the "
                                    "checkpoint is incomplete, resume from an earlier one")
        states = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(states, list) or len(states) != len(parts):
            raise ValueError(f"{path}: holds {len(states) if isinstance(states, list) else type(states).__name__} "
                             f"optimizer states, this model has {len(parts)}; the checkpoint is from another model")
    # (a scatter over the data-parallel gloo group; fp32 main params are views of the model's
    # parameters, written in place, so outside autograd)
    with torch.no_grad():
        for i, part in enumerate(parts):
            with _per_parameter_steps_aside(part.optimizer):
                part.load_parameter_state_from_dp_zero(states[i] if states is not None else None)


@contextlib.contextmanager
def _per_parameter_steps_aside(inner):
    """torch.optim.Adam (megatron's fallback without Transformer Engine or apex, as on a CPU) keeps
    a per-parameter ``step`` beside ``exp_avg``/``exp_avg_sq``; megatron's parameter state has no
    ``step`` (``load_state_dict`` restores it) and its loader copies every key the inner state has,
    so the ``step`` entries are set aside for the load and put back, one tensor each: megatron's
    ``load_state_dict`` hands every parameter the same step tensor, which Adam's in-place
    ``step += 1`` would then advance once per parameter per update. Fused Adams keep no such key."""
    state = getattr(inner, "state", {})
    steps = {p: st.pop("step") for p, st in state.items() if isinstance(st, dict) and "step" in st}
    try:
        yield
    finally:
        for p, step in steps.items():
            state[p]["step"] = step.clone() if isinstance(step, torch.Tensor) else step
