"""The one place in megatron_prism that knows it may run on a CPU.

megatron-core assumes CUDA in a handful of spots that have nothing to do with the maths: it asks
``torch.cuda.current_device()`` where to allocate, forks CUDA RNG states, synchronises streams and
creates a few bookkeeping tensors with ``device="cuda"``. On a machine without a GPU we redirect
exactly those calls to the CPU so that the *same* megatron code path (parallel state, layers,
pipeline schedules, DDP, optimizer) runs over a gloo process group. Each line below names the
megatron call it serves; see ``../shared/reference/cpu-findings.md`` for how each was found.

Nothing is patched when CUDA is available: :func:`install` returns at once, so GPU runs use
megatron-core untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_INSTALLED = False

# megatron modules that create tensors with device="cuda" (or torch.cuda.current_device()) for
# bookkeeping: pipeline schedules (loss/grad-norm scalars), the optimizer and gradient clipping,
# DDP gradient buffers, and megatron.core.utils.
_MODULES_WITH_CUDA_TENSORS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)


def on_cpu() -> bool:
    """True when there is no CUDA device, i.e. when the shim is (to be) installed."""
    return not torch.cuda.is_available()


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "factory")
    return wrapped


def _torch_proxy() -> types.ModuleType:
    """A stand-in for the ``torch`` module whose tensor factories map cuda devices to cpu."""
    proxy = types.ModuleType("torch_cpu_proxy")
    factories = {
        name: _cpu_factory(getattr(torch, name))
        for name in ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like")
    }

    def __getattr__(name: str) -> Any:
        if name in factories:
            return factories[name]
        return getattr(torch, name)

    proxy.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return proxy


class _NullStream:
    """Enough of a CUDA stream/event for megatron's device-to-host copies on CPU."""

    def wait_stream(self, *_: Any) -> None:
        return None

    def record_event(self, *_: Any) -> "_NullStream":
        return self

    def synchronize(self) -> None:
        return None

    def wait_event(self, *_: Any) -> None:
        return None

    def record(self, *_: Any) -> None:
        return None

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


class _NullStreamClass(_NullStream):
    """``torch.cuda.Stream(...)`` / ``torch.cuda.Event(...)`` on CPU: a null stream of any arguments."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass


def _all_to_all_with_list_splits(fn):
    def wrapped(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if output_split_sizes is not None and hasattr(output_split_sizes, "tolist"):
            output_split_sizes = output_split_sizes.tolist()
        if input_split_sizes is not None and hasattr(input_split_sizes, "tolist"):
            input_split_sizes = input_split_sizes.tolist()
        return fn(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    wrapped._prism_lists = True  # type: ignore[attr-defined]
    return wrapped


def install() -> bool:
    """Install the shim once, when there is no GPU. Returns True when it is (now) installed."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if not on_cpu():
        return False

    cuda = torch.cuda
    cpu = torch.device("cpu")
    # Allocation sites: megatron passes torch.cuda.current_device() as `device=`.
    cuda.current_device = lambda: cpu  # type: ignore[assignment]
    cuda.set_device = lambda *_a, **_k: None  # type: ignore[assignment]
    # p2p_communication and timers synchronise; nothing to wait for on CPU.
    cuda.synchronize = lambda *_a, **_k: None  # type: ignore[assignment]
    # RNG tracker: megatron keeps named CUDA RNG states; map them onto the CPU generator.
    cuda.get_rng_state = lambda *_a, **_k: torch.get_rng_state()  # type: ignore[assignment]
    cuda.set_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)  # type: ignore
    # (torch.manual_seed itself calls cuda.manual_seed_all, which stays lazy without CUDA.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore
    # Streams used by the MoE alltoall dispatcher and DDP overlap.
    # Classes, not lambdas: libraries imported later use them in annotations (``Stream | None``).
    cuda.Stream = _NullStreamClass  # type: ignore[assignment]
    cuda.current_stream = lambda *_a, **_k: _NULL_STREAM  # type: ignore[assignment]
    cuda.stream = lambda *_a, **_k: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.Event = _NullStreamClass  # type: ignore[assignment]

    # megatron moves some tensors with `.cuda()` (e.g. the tied output-layer copy on the last
    # pipeline stage before its first all-reduce); on a CPU-only machine they stay where they are.
    torch.Tensor.cuda = lambda self, *_a, **_k: self  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()

    # MoE (the discriminator). megatron-core 0.16 leaves this name undefined without Transformer
    # Engine, and the router looks it up (NameError) even when it will not use it.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # The alltoall dispatcher (EP > 1) passes numpy split sizes, which torch 2.13's gloo refuses.
    if not getattr(dist.all_to_all_single, "_prism_lists", False):
        dist.all_to_all_single = _all_to_all_with_list_splits(dist.all_to_all_single)

    proxy = _torch_proxy()
    for name in _MODULES_WITH_CUDA_TENSORS:
        importlib.import_module(name).torch = proxy

    _INSTALLED = True
    log.info("megatron_prism: CPU compatibility shim installed (no CUDA device)")
    return True


@contextlib.contextmanager
def distributed_optimizer_types():
    """While megatron builds its distributed optimizer on a CPU: report host float tensors under
    their CUDA type names.

    megatron-core 0.16.1's ``DistributedOptimizer._build_model_and_main_param_groups`` sorts the
    model's parameters by ``param.type()`` and refuses anything but ``torch.cuda.{Float,Half,
    BFloat16}Tensor``. Nothing else in it needs CUDA (its reduce-scatter / all-gather run on gloo
    and its allocations go through ``torch.cuda.current_device()``, redirected by :func:`install`),
    so for that one construction a CPU ``FloatTensor`` answers as a CUDA one. A no-op with a GPU.
    """
    if not on_cpu():
        yield
        return
    names = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
             "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}
    original = torch.Tensor.type

    def type_name(self, *args: Any, **kwargs: Any):
        out = original(self, *args, **kwargs)
        return names.get(out, out) if not args and not kwargs else out

    torch.Tensor.type = type_name  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def transformer_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields that must differ on a CPU.

    ``use_cpu_initialization``: weights are initialised on the host.

    ``batch_p2p_comm=False``: gloo matches an ``isend`` to an ``irecv`` between the same two ranks
    by posting order. Megatron's batched p2p posts ``send_prev, recv_prev, send_next, recv_next``;
    in the interleaved schedule at PP=2 the previous and the next rank are the same rank, so rank 0
    sends [grad, activation] while rank 1 posts receives for [activation, grad] and the two
    same-shaped tensors are silently swapped (micro-batches after warm-up get wrong losses). The
    unbatched path orders sends and receives by even/odd rank and puts one direction on a second
    group, which gloo matches correctly.
    """
    if not on_cpu():
        return {}
    return {"use_cpu_initialization": True, "batch_p2p_comm": False}


def process_group_backend() -> str:
    """gloo on CPU, nccl on GPU."""
    return "gloo" if on_cpu() else "nccl"


def default_device() -> torch.device:
    """Where this process computes: the current CUDA device, or the CPU."""
    if on_cpu():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
