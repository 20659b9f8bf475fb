"""The parameter state of megatron's distributed optimizer, saved and restored exactly.

Why: ``DistributedOptimizer.state_dict()`` (megatron-core 0.16.1) holds only the step counts and
hyper-parameters; each rank's shard of the fp32 main parameters and Adam's ``exp_avg`` /
``exp_avg_sq`` live outside it, and ``load_state_dict`` refills them with ``torch.empty`` "to be
overwritten by load_parameter_state()". A resume that restores only the state dict continues from
garbage moments. Here each distributed optimizer's parameter state is gathered to its
data-parallel rank 0 (``get_parameter_state_dp_zero``, over megatron's gloo data-parallel group),
travels in that rank's checkpoint payload (``PolicyOptimizer.state_dict``, written hashed and
loaded with ``torch.load(weights_only=True)``), and on load is scattered back
(``load_parameter_state_from_dp_zero``). The gathered form is in model space, unpadded.

Under MoE the chained optimizer has a dense part (data-parallel group) and an expert part
(expert-data-parallel group): each part is gathered to its own group's rank 0, so a rank may hold
the state of one part and not of the other; the list keeps one entry per part (None where this
rank is not the part's data-parallel rank 0).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def _distributed_parts(optimizer) -> list:
    """The distributed optimizers inside megatron's (possibly chained) optimizer."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if hasattr(p, "get_parameter_state_dp_zero")]


def has_parameter_state(optimizer) -> bool:
    """True when ``optimizer`` keeps state outside its ``state_dict`` (a distributed optimizer)."""
    return bool(_distributed_parts(optimizer))


def gather_parameter_state(optimizer) -> list[Any]:
    """Collective over each part's data-parallel group (every rank calls it): the parameter state
    of every distributed optimizer part, on that part's data-parallel rank 0 (None elsewhere)."""
    return [part.get_parameter_state_dp_zero() for part in _distributed_parts(optimizer)]


def scatter_parameter_state(optimizer, states: list[Any] | None, *, origin: str) -> None:
    """Inverse of :func:`gather_parameter_state` (a collective: every rank calls it, after
    ``optimizer.load_state_dict``). ``origin`` names the file ``states`` came from, for errors."""
    parts = _distributed_parts(optimizer)
    if not parts:
        return
    if not isinstance(states, list) or len(states) != len(parts):
        held = f"{len(states)} optimizer parts" if isinstance(states, list) else "no distributed-optimizer state"
        raise ValueError(f"{origin}: holds {held}, this model's optimizer has {len(parts)} distributed parts; the "
                         "checkpoint was written without the distributed optimizer or by another model (set "
                         "optim.use_distributed_optimizer as when it was written, or resume from another one)")
    for part, state in zip(parts, states):
        if part.data_parallel_group_gloo.rank() == 0 and state is None:
            raise ValueError(f"{origin}: this rank is data-parallel rank 0 of an optimizer part but its saved "
                             "parameter state is empty; the checkpoint is damaged, resume from an earlier one")
    # (a scatter over the data-parallel gloo group; fp32 main params are views of the model's
    # parameters, written in place, so outside autograd)
    with torch.no_grad():
        for part, state in zip(parts, states):
            with _per_parameter_steps_aside(part.optimizer):
                part.load_parameter_state_from_dp_zero(state if part.data_parallel_group_gloo.rank() == 0 else None)


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
