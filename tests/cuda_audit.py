"""A CPU machine that checks devices the way a CUDA machine does (the device audit's harness).

Why not ``FakeTensorMode``: on this CPU-only torch build it does raise the GPU's own error on a
CPU/CUDA mix, but a backward through a parameter on its fake ``cuda:0`` aborts the whole process
("PyTorch is not linked with support for cuda devices", from autograd's AccumulateGrad), boolean
indexing aborts likewise, and every data-dependent step (``.item()``, ``int(mask.sum())``, megatron's
grad norm) raises ``DataDependentOutputException``. A training step cannot run under it.

So the audit keeps real data on the CPU and tracks, per storage, a *virtual device*: ``cuda:0``
or host. Two torch modes do it:

* a ``TorchFunctionMode`` makes tensors on the virtual GPU answer ``.device`` / ``.is_cuda`` /
  ``.get_device()`` / ``.type()`` as CUDA tensors do, turns ``device="cuda"`` / ``device=0`` in any
  call (factories, ``.to``, ``.new_*``) into a host allocation marked ``cuda:0``, makes ``.to()`` /
  ``.cuda()`` / ``.cpu()`` copy between the two like real device moves, and refuses ``.numpy()`` of
  a tensor on the GPU;
* a ``TorchDispatchMode`` sees every aten op, backward included, and applies CUDA's rule before
  running it on the CPU: all tensor operands on one device, except 0-dim host tensors (CPU
  scalars, which CUDA kernels accept), host index tensors of ``index`` / ``index_put`` (CUDA moves
  them), and the copy ops that cross devices by design. A mix raises the GPU's error text:
  "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!".
  Outputs live where their inputs did.

While the audit is on, megatron-core allocates as on a GPU: ``torch.cuda.current_device()`` is 0,
``Tensor.cuda`` moves, and the modules that ``cpu_compat`` gives a cuda->cpu torch proxy get the
real torch back (their ``device="cuda"`` tensors land on the virtual GPU).

Collectives: ``torch.distributed``'s collectives check that their tensors sit on the device of
their group's backend and then run over the real (gloo, one-rank) group, so their results are
the real ones. Every group counts as NCCL (what a GPU job gives megatron's groups) except the
host groups that ``megatron_prism.parallel`` hands out for host-side bookkeeping and megatron's
own gloo groups, which count as gloo (CPU tensors only). ``dist.get_backend`` answers the same.

On a machine with CUDA, :func:`audit` is a plain context (nothing patched): the real GPU and NCCL
check everything themselves (tools/gpu_smoke.sh runs the audit tests there).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)
HOST = torch.device("cpu")
MIX_ERROR = "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"


class DeviceMixError(RuntimeError):
    """What CUDA raises on a CPU/CUDA mix (same text), with the op that did it."""


def _storage_key(t: torch.Tensor) -> int | None:
    """The storage's address (views share it); None for a storage of no bytes."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr() if storage.nbytes() > 0 else None
    except (RuntimeError, NotImplementedError):
        return None


class _State:
    """Device tags by storage address. Each tagged storage is kept alive until the audit ends, so
    no address is reused: a tensor made below the dispatcher (a wrapped Python scalar, say) can
    never inherit the tag of a freed GPU storage."""

    def __init__(self) -> None:
        self.on_gpu: dict[int, tuple[bool, Any]] = {}
        self.collectives: list[tuple[str, str, str]] = []  # (name, backend, devices)
        # Inside a backward, allocations the autograd engine makes in C++ (zero gradients of
        # unused outputs, index_put's gradient buffer) take their device from a forward tensor's
        # options (``grad.new_zeros(self.sizes(), self.options())``): on the real host here, on
        # the GPU there. They come with no Python call around them (py_depth 0), and the audited
        # backwards only differentiate GPU tensors.
        self.in_backward = False
        self.py_depth = 0

    def is_gpu(self, t: torch.Tensor) -> bool:
        key = _storage_key(t)
        if key is None:  # an empty storage: the tag sits on the tensor object
            return bool(getattr(t, "_audit_on_gpu", False))
        return self.on_gpu.get(key, (False, None))[0]

    def mark(self, out: Any, gpu: bool) -> None:
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key is None:
                    t._audit_on_gpu = gpu
                else:
                    self.on_gpu[key] = (gpu, t.untyped_storage())


def _as_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


# Ops that move data between devices by design, or only look at one tensor's metadata.
_NO_CHECK = {
    aten._to_copy.default, aten.copy_.default, aten.detach.default, aten.alias.default,
    aten.lift_fresh.default, aten.lift_fresh_copy.default, aten._local_scalar_dense.default,
    aten.set_.source_Storage, aten.set_.source_Tensor, aten.set_.source_Storage_storage_offset,
}
# self (and values) must be on one device; the index tensors may be host tensors.
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class _DispatchCheck(TorchDispatchMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if func.namespace in ("c10d", "_c10d_functional", "profiler") or func in _NO_CHECK:
            out = func(*args, **kwargs)
            if func is aten._to_copy.default or func is aten.lift_fresh_copy.default or func is aten.detach.default \
                    or func is aten.alias.default:
                src = args[0]
                if func is aten._to_copy.default and kwargs.get("device") is not None:
                    st.mark(out, _as_device(kwargs["device"]).type == "cuda")
                else:
                    st.mark(out, st.is_gpu(src))
            return out
        checked = [args[0]] if func in _INDEX_OPS else pytree.tree_leaves((args, kwargs))
        if func in (aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            checked = [args[0], args[2]]
        tensors = [t for t in checked if isinstance(t, torch.Tensor)]
        gpu = [st.is_gpu(t) for t in tensors]
        if any(gpu) and not all(gpu):
            hosts = [tuple(t.shape) for t, g in zip(tensors, gpu) if not g and t.dim() > 0]
            if hosts:
                raise DeviceMixError(f"{MIX_ERROR} (in {func}: host operand(s) of shape {hosts})")
        out = func(*args, **kwargs)
        device = _as_device(kwargs.get("device"))
        all_inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if st.in_backward and st.py_depth == 0 and (device is not None or not all_inputs):
            st.mark(out, True)  # an autograd-engine allocation for a GPU gradient
        elif device is not None:
            st.mark(out, device.type == "cuda")
        elif func._schema.is_mutable or func.name().endswith("_"):
            pass  # in place: the output is an input and keeps its device
        else:
            st.mark(out, any(st.is_gpu(t) for t in (tensors or all_inputs)))
        return out


_GETTERS = {torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.is_cpu.__get__}


class _FunctionView(TorchFunctionMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        st = self.state
        st.py_depth += 1
        try:
            return self._handle(func, args, dict(kwargs or {}))
        finally:
            st.py_depth -= 1

    def _handle(self, func, args, kwargs):
        st = self.state
        if func in _GETTERS:
            t = args[0]
            real = func(*args)
            if not st.is_gpu(t):
                return real
            if func == torch.Tensor.device.__get__:
                return CUDA
            return func == torch.Tensor.is_cuda.__get__
        if func is torch.Tensor.get_device:
            return 0 if st.is_gpu(args[0]) else func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # (cpu_compat's distributed-optimizer shim may have named it CUDA already)
            return name.replace("torch.", "torch.cuda.", 1) if st.is_gpu(args[0]) and ".cuda." not in name else name
        if func is torch.Tensor.numpy and st.is_gpu(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                            "host memory first.")
        if func is torch.autograd.backward:
            return self._backward(*args, **kwargs)
        if func is torch._C._nn._parse_to:
            return _parse_to_with_gpu_index(func)(*args, **kwargs)
        if func is torch.Tensor.to:
            return self._to(args, kwargs)
        if func is torch.Tensor.cpu:
            return self._move(args[0], HOST, None, False)
        if func is torch.Tensor.pin_memory:
            return args[0].clone() if not st.is_gpu(args[0]) else func(*args, **kwargs)
        device = _as_device(kwargs.get("device")) if "device" in kwargs else None
        if device is not None and device.type == "cuda":
            kwargs["device"] = HOST
            kwargs.pop("pin_memory", None)
            out = func(*args, **kwargs)
            st.mark(out, True)
            return out
        return func(*args, **kwargs)

    def _backward(self, tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
        """torch.autograd.backward with this mode kept on: a mode is off inside its own handler, and
        the backward of custom autograd Functions (the fused head's) reads devices from Python."""
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
        st = self.state
        depth, st.py_depth, st.in_backward = st.py_depth, 0, True
        try:
            with self:
                _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph,
                                     create_graph, tuple(inputs or ()), allow_unreachable=True, accumulate_grad=True)
        finally:
            st.py_depth, st.in_backward = depth, False

    def _to(self, args, kwargs):
        t = args[0]
        rest = list(args[1:])
        if rest and isinstance(rest[0], torch.Tensor):  # .to(other): its device and dtype
            other = rest.pop(0)
            kwargs.setdefault("dtype", other.dtype)
            kwargs.setdefault("device", CUDA if self.state.is_gpu(other) else HOST)
        if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool):
            rest[0] = torch.device("cuda", rest[0])
        if isinstance(kwargs.get("device"), int):
            kwargs["device"] = torch.device("cuda", kwargs["device"])
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **{k: v for k, v in kwargs.items()
                                                                          if k not in ("copy",)})
        copy = bool(kwargs.get("copy", False))
        return self._move(t, device, dtype, copy, non_blocking)

    def _move(self, t, device, dtype, copy, non_blocking=False):
        st = self.state
        here = st.is_gpu(t)
        if device is None:
            target = here
        else:
            target = _as_device(device).type == "cuda"
        if target == here:
            with torch._C.DisableTorchFunctionSubclass():
                out = t.to(dtype=dtype or t.dtype, copy=copy)
            if out is not t:
                st.mark(out, here)
            return out
        with torch._C.DisableTorchFunctionSubclass():
            out = t.to(dtype=dtype or t.dtype, copy=True)
        st.mark(out, target)
        return out


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "_all_gather_base", "_reduce_scatter_base", "reduce", "gather", "scatter", "reduce_scatter",
                "send", "recv", "isend", "irecv", "all_to_all_single", "all_to_all")


def host_groups() -> list:
    """Groups that stay gloo on a GPU job: megatron's gloo groups and the project's host groups."""
    groups = []
    from megatron_prism.parallel import devices

    groups += devices.host_group_handles()
    from megatron.core import parallel_state as ps

    # (with and without context parallelism: megatron's optimizer gathers its parameter state over
    # the data-parallel-with-CP gloo group, a separate handle even at CP=1)
    variants = ({}, {"with_context_parallel": True})
    for name in ("get_data_parallel_group_gloo", "get_data_modulo_expert_parallel_group_gloo",
                 "get_expert_data_parallel_group_gloo"):
        fn = getattr(ps, name, None)
        for kwargs in variants if fn is not None else ():
            try:
                g = fn(**kwargs)
            except (AssertionError, RuntimeError, TypeError):
                continue
            if g is not None:
                groups.append(g)
    return groups


class Audit:
    """What an audit saw: the collectives (name, backend, devices) it checked."""

    def __init__(self, state: _State) -> None:
        self._state = state

    @property
    def collectives(self) -> list[tuple[str, str, str]]:
        return self._state.collectives

    def on_gpu(self, t: torch.Tensor) -> bool:
        """Where ``t`` lives: True on the (virtual) GPU."""
        return t.is_cuda if torch.cuda.is_available() else self._state.is_gpu(t)


def _checked_collective(name: str, fn, state: _State, backend_of):
    def wrapped(*args, **kwargs):
        group = kwargs.get("group")
        if group is None:
            for a in args:
                if isinstance(a, dist.ProcessGroup):
                    group = a
        backend = backend_of(group)
        tensors = []
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                tensors.append(a)
            elif isinstance(a, (list, tuple)):
                tensors += [x for x in a if isinstance(x, torch.Tensor)]
        devices = ["cuda" if state.is_gpu(t) else "cpu" for t in tensors]
        state.collectives.append((name, backend, ",".join(devices)))
        want = "cuda" if backend == "nccl" else "cpu"
        wrong = [tuple(t.shape) for t, d in zip(tensors, devices) if d != want]
        if wrong:
            raise DeviceMixError(
                f"dist.{name} on a {backend} group got {'host' if want == 'cuda' else 'CUDA'} tensor(s) of shape "
                f"{wrong}: {backend} communicates {want.upper()} tensors only")
        return fn(*args, **kwargs)

    return wrapped


def _parse_to_with_gpu_index(parse):
    """``module.to(device=0)`` means cuda:0 on a GPU machine (a CPU build reads it as the host)."""
    def wrapped(*args, **kwargs):
        args = list(args)
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            args[0] = torch.device("cuda", args[0])
        if isinstance(kwargs.get("device"), int):
            kwargs["device"] = torch.device("cuda", kwargs["device"])
        return parse(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def audit() -> Iterator[Audit]:
    """Run the block as on a one-GPU NCCL job (see the module docstring)."""
    state = _State()
    if torch.cuda.is_available():
        yield Audit(state)
        return
    from megatron_prism.parallel import cpu_compat

    def backend_of(group=None):
        if group is not None and any(group is g for g in host_groups()):
            return "gloo"
        return "nccl"

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(torch.cuda, "current_device", lambda: 0))
        # A GPU build allocates its weights on the device (no use_cpu_initialization).
        stack.enter_context(_patched(cpu_compat, "transformer_config_overrides", lambda: {"batch_p2p_comm": False}))
        stack.enter_context(_patched(torch.Tensor, "cuda",
                                     lambda self, device=None, non_blocking=False, **_: self.to(
                                         _as_device(device) if device is not None else CUDA, non_blocking=non_blocking)))
        for mod_name in cpu_compat._MODULES_WITH_CUDA_TENSORS:
            stack.enter_context(_patched(importlib.import_module(mod_name), "torch", torch))
        stack.enter_context(_patched(dist, "get_backend", lambda group=None: backend_of(group)))
        # megatron's MoE dispatcher records its device-to-host copies on a (here null) CUDA stream
        stack.enter_context(_patched(torch.Tensor, "record_stream", lambda self, stream: None))
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                stack.enter_context(_patched(dist, name, _checked_collective(name, getattr(dist, name), state,
                                                                             backend_of)))
        stack.enter_context(_FunctionView(state))
        stack.enter_context(_DispatchCheck(state))
        yield Audit(state)
