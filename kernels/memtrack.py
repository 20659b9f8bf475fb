"""Peak memory of a piece of torch code, counted from its allocations instead of a device's allocator.

``LiveStorageTracker`` is a ``TorchDispatchMode``: every tensor an operator returns is looked at,
its storage recorded once (with its size in bytes) while it is alive, and the running sum's peak
kept. Storages that existed before the mode was entered (inputs, parameters, megatron's
``main_grad``) are not counted: the figure is the peak *above* the baseline, as
``torch.cuda.max_memory_allocated() - memory_allocated()`` would give on a GPU.

Why: under torch's ``FakeTensorMode`` tensors have shapes and devices but no data, so the memory of
a forward + backward at full size (T=8192, V=151936, H=4096: 5 GB of fp32 logits on the
materialised path) can be measured on a CPU without computing anything. The same tracker runs on
real CPU tensors too (the tests use it to check that the chunked path never holds ``[T, V]``).

Not counted: allocator rounding and fragmentation, cuBLAS workspaces, and memory a custom kernel
allocates by itself (the Triton kernels here allocate none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorageTracker(TorchDispatchMode):
    """Counts the bytes of the storages created while it is active and alive; ``peak`` is their
    highest sum, ``current`` the sum now."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        # storages that existed before (seen first as an operator's input): never counted
        self._known: dict[int, StorageWeakRef] = {}
        self.current = 0
        self.peak = 0

    def ignore(self, *tensors: torch.Tensor) -> None:
        """Declare pre-existing tensors (their storages) as baseline."""
        for t in tensors:
            storage = t.untyped_storage()
            self._known[storage._cdata] = StorageWeakRef(storage)

    def _purge(self) -> None:
        for k in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(k)[1]
        for k in [k for k, ref in self._known.items() if ref.expired()]:
            del self._known[k]  # its address may be reused by a new storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self._live and storage._cdata not in self._known:
                    self._known[storage._cdata] = StorageWeakRef(storage)
        out = func(*args, **(kwargs or {}))
        self._purge()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self._known or key in self._live:
                    continue
                nbytes = storage.nbytes()
                self._live[key] = (StorageWeakRef(storage), nbytes)
                self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], Any], *baseline: torch.Tensor) -> int:
    """Run ``fn()`` under a tracker; the peak bytes of the storages it created (``baseline``
    tensors' storages excluded even if an operator returns them)."""
    tracker = LiveStorageTracker()
    tracker.ignore(*baseline)
    with tracker:
        result = fn()
        del result
    return tracker.peak
