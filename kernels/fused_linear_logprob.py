"""LM head -> per-token log-prob (+ entropy), chunked over tokens on the platform matmul.

What: ``fused_linear_logprob(hidden, weight, targets)`` returns ``log softmax(hidden @ weight.T)``
at the target ids (and optionally the entropy of that softmax) for a vocab-parallel LM head, with
gradients for ``hidden`` and ``weight``, never holding more than one chunk of logits.
``fused_linear_logprob_loss`` does the same for a loss that is a sum over tokens and computes the
gradients in its single pass. ``linear_logprob_reference`` is the readable definition (it
materialises all ``[T, V]`` logits).

Why: RL post-training needs only the log-prob of the sampled token (and the entropy) per
position, but the plain route materialises ``[T, V]`` logits: T=8K tokens x V=151936 (Qwen3's
vocab) is 5 GB in fp32, plus as much again for their gradient.

How (the Liger-Kernel approach): the tokens are taken in chunks whose logits fit a memory budget
(``chunk_bytes``). For each chunk

1. ``z = h_c @ W.T`` by the platform matmul (cuBLAS on a GPU, the CPU's BLAS here), into one
   reused ``[rows, V_local]`` buffer in the weight's dtype (bf16 logits in bf16 training, as
   megatron's output layer produces them);
2. a Triton kernel sweeps each row once: online log-sum-exp (running max and rescaled sum), the
   target's logit, and the entropy accumulator ``sum e (z - max)``;
3. the per-row statistics are combined over the tensor-parallel group as megatron's vocab-parallel
   cross-entropy does (MAX of the maxima, SUM of the rescaled sums and of the target logit that
   only the owning rank holds), so every rank ends with the global log-prob and entropy;
4. for a gradient, a second Triton kernel overwrites the logits in place with
   ``dz = glp (1[t] - p) - gent p (H + z - lse)`` (``glp, gent``: the loss's gradient with
   respect to the row's log-prob and entropy), and two matmuls finish the chunk:
   ``dh_c = dz @ W`` and ``dW += dz.T @ h_c``, the latter accumulated straight into megatron's
   fp32 ``weight.main_grad`` when the weight has one (no fp32 ``[V, H]`` temporary, no bf16 copy).

FLOPs. ``fused_linear_logprob_loss`` knows each token's loss gradient as soon as its chunk's
statistics are combined, so one pass does all three matmuls: exactly ``6 T V H`` for forward and
backward (its backward only rescales by the incoming gradient, see there). ``fused_linear_logprob``
serves any downstream loss, so its backward must recompute each chunk's logits: ``2 T V H``
forward (all that old/reference log-probs under ``no_grad`` cost) and ``8 T V H`` with backward.

Rows whose target is ``IGNORE_INDEX`` (-100) are dropped before the matmuls (in RL the prompt's
positions, often the larger part of a sequence, cost nothing); they get log-prob 0, entropy 0 and
no gradient. ``vocab_limit`` marks the vocabulary's padding: columns with a global id at or above
it count in neither the log-sum-exp, the entropy nor the gradient.

On a CPU the same chunked algorithm runs with torch ops for steps 2 and 4 (``engine="torch"``),
so CPU training never holds ``[T, V]`` either; under ``TRITON_INTERPRET=1`` the Triton kernels run
in the interpreter, which is how the tests check them without a GPU. On a GPU the kernels'
vocab tile and warp count are autotuned per vocab size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import triton
import triton.language as tl

IGNORE_INDEX = -100
#: Default memory budget for one chunk of logits (and, on the torch engine, its fp32 temporaries).
DEFAULT_CHUNK_BYTES = 256 * 2**20
ENGINES = ("auto", "triton", "torch")
#: Vocab tile of the kernels under the Triton interpreter (no autotuning there); tests make it
#: small so a row spans several tiles and a ragged last one.
INTERPRET_BLOCK_V = 256
#: The weight-gradient accumulation path the last backward took (for tests and the benchmark):
#: "fp32" (fp32 operands), "addmm_out_dtype" (one bf16/fp16 GEMM accumulating in fp32 into the
#: target), "sliced" (bf16/fp16 GEMM per vocab slice, added to the fp32 target), "cpu_upcast".
LAST_WGRAD_PATH: str | None = None


def _empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Buffers a kernel or matmul fully overwrites come from here, uninitialised. Tests monkeypatch
    this to fill NaN, so an element nobody writes shows up in the comparison."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grid(rows: int) -> tuple[int]:
    """One program per row; a seam for the test that proves a skipped row shows."""
    return (rows,)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _rows(x: torch.Tensor, pos: slice) -> torch.Tensor:
    """x[pos] for a step-1 slice, as ``narrow`` (Python indexing of a fake CUDA tensor on a CPU-only
    torch build asks for a CUDA device guard and fails; ``narrow`` goes through the dispatcher)."""
    return x.narrow(0, pos.start, pos.stop - pos.start)


def _is_fake(t: torch.Tensor) -> bool:
    """Fake tensors (torch's FakeTensorMode) carry shapes, not values: the memory measurement in
    kernels/bench.py runs this module on them. The kernels allocate nothing of their own (their
    outputs come from ``_empty``), so skipping their launch keeps the allocation pattern exact."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# --------------------------------------------------------------------------------------------
# Triton kernels: one program per row of a chunk of logits
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_stats_kernel(z_ptr, z_stride, tgt_ptr, m_ptr, s_ptr, ez_ptr, zt_ptr, col_limit, vocab_start,
                      WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """For row r of z (its first ``col_limit`` columns): m = max z, s = sum exp(z - m),
    ez = sum exp(z - m) (z - m), zt = z[target - vocab_start] (0 if not in this shard)."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * z_stride
    # 0-d fp32 tensors (not Python floats), so the loop-carried types are fixed from the start
    zeros = tl.zeros([BLOCK_V], tl.float32)
    m = tl.max(zeros - float("inf"), axis=0)
    s = tl.sum(zeros, axis=0)
    ez = tl.sum(zeros, axis=0)
    for v0 in range(0, col_limit, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < col_limit
        z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        # each tile holds >= 1 valid column, so m_new is finite from the first tile on
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        e = tl.exp(z - m_new)  # masked columns: exp(-inf) = 0
        if WITH_ENTROPY:
            # kept relative to the running max (sum e (z - m), not sum e z), so that
            # entropy = log s - ez / s has no cancellation between two |z|-sized terms;
            # rebasing to m_new: sum e'(z - m_new) = alpha (ez + (m - m_new) s)
            zrel = tl.where(ok, z - m_new, 0.0)
            shift = tl.where(s > 0.0, m - m_new, 0.0)  # s = 0 before the first tile: no -inf * 0
            ez = alpha * (ez + shift * s) + tl.sum(e * zrel, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    local = tl.load(tgt_ptr + row) - vocab_start
    owned = (local >= 0) & (local < col_limit)
    zt = tl.load(z_row + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(zt_ptr + row, zt)
    if WITH_ENTROPY:
        tl.store(ez_ptr + row, ez)


@triton.jit
def _row_grad_kernel(z_ptr, z_stride, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, n_cols, col_limit,
                     vocab_start, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrites row r of z with dL/dz = glp (1[j = t] - p_j) - gent p_j (H + z_j - lse), where
    p = softmax (global lse) and H the entropy; 0 in the padding columns (>= col_limit)."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * z_stride
    lse = tl.load(lse_ptr + row)
    glp = tl.load(glp_ptr + row)
    local = tl.load(tgt_ptr + row) - vocab_start
    ent = tl.load(ent_ptr + row)  # dummies (lse, glp) when WITH_ENTROPY is off: never used
    gent = tl.load(gent_ptr + row)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < col_limit
        zc = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32) - lse
        p = tl.where(ok, tl.exp(zc), 0.0)
        dz = tl.where(cols == local, glp, 0.0) - glp * p
        if WITH_ENTROPY:
            # dH/dz_j = p_j (E[z] - z_j) and E[z] - z_j = -(H + z_j - lse)
            dz -= gent * p * (ent + zc)
        tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=cols < n_cols)


def _tile_configs() -> list:
    return [triton.Config({"BLOCK_V": b}, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)
            if b >= 128 * w]


# Autotuned on a GPU, per vocab shard size (a Triton autotuner times every config on first use;
# the gradient kernel writes in place, so it restores z between the trial runs).
_row_stats_tuned = triton.autotune(configs=_tile_configs(), key=["col_limit", "WITH_ENTROPY"])(_row_stats_kernel)
_row_grad_tuned = triton.autotune(configs=_tile_configs(), key=["n_cols", "WITH_ENTROPY"],
                                  restore_value=["z_ptr"])(_row_grad_kernel)


def _launch(tuned, plain, grid, *args, **kwargs) -> None:
    if _interpreting():
        plain[grid](*args, BLOCK_V=INTERPRET_BLOCK_V, **kwargs)
    else:
        tuned[grid](*args, **kwargs)


# --------------------------------------------------------------------------------------------
# The per-chunk row operations: Triton kernels, or torch ops (CPU)
# --------------------------------------------------------------------------------------------


@dataclass
class _RowStats:
    """Per-row statistics of this rank's shard, float32 ``[n]``: max, rescaled sum, entropy
    accumulator (None without entropy) and the target's logit (0 where another rank owns it)."""

    m: torch.Tensor
    s: torch.Tensor
    ez: torch.Tensor | None
    zt: torch.Tensor


def _stats_triton(z: torch.Tensor, tgt: torch.Tensor, col_limit: int, vocab_start: int,
                  with_entropy: bool) -> _RowStats:
    n = z.shape[0]
    out = _RowStats(*(_empty((n,), dtype=torch.float32, device=z.device) for _ in range(2)),
                    _empty((n,), dtype=torch.float32, device=z.device) if with_entropy else None,
                    _empty((n,), dtype=torch.float32, device=z.device))
    if n and not _is_fake(z):
        _launch(_row_stats_tuned, _row_stats_kernel, _grid(n), z, z.stride(0), tgt, out.m, out.s,
                out.ez if with_entropy else out.s, out.zt, col_limit, vocab_start, WITH_ENTROPY=with_entropy)
    return out


def _grad_triton(z: torch.Tensor, tgt: torch.Tensor, col_limit: int, vocab_start: int, lse: torch.Tensor,
                 ent: torch.Tensor | None, glp: torch.Tensor, gent: torch.Tensor | None) -> None:
    n = z.shape[0]
    if n and not _is_fake(z):
        with_entropy = ent is not None
        _launch(_row_grad_tuned, _row_grad_kernel, _grid(n), z, z.stride(0), tgt, lse,
                ent if with_entropy else lse, glp, gent if with_entropy else glp, z.shape[1], col_limit,
                vocab_start, WITH_ENTROPY=with_entropy)


def _stats_torch(z: torch.Tensor, tgt: torch.Tensor, col_limit: int, vocab_start: int,
                 with_entropy: bool) -> _RowStats:
    n = z.shape[0]
    local = tgt - vocab_start
    owned = (local >= 0) & (local < col_limit)
    zt = torch.where(owned, z.gather(1, torch.where(owned, local, 0)[:, None]).squeeze(1).float(), 0.0)
    if col_limit == 0:
        zero = torch.zeros(n, dtype=torch.float32, device=z.device)
        return _RowStats(torch.full_like(zero, float("-inf")), zero, zero.clone() if with_entropy else None, zt)
    zc = z[:, :col_limit].to(torch.float32, copy=True)  # z itself stays: the gradient reuses it
    m = zc.amax(dim=1)
    zc.sub_(m[:, None])
    e = torch.exp(zc)
    s = e.sum(dim=1)
    ez = e.mul_(zc).sum(dim=1) if with_entropy else None
    return _RowStats(m, s, ez, zt)


def _grad_torch(z: torch.Tensor, tgt: torch.Tensor, col_limit: int, vocab_start: int, lse: torch.Tensor,
                ent: torch.Tensor | None, glp: torch.Tensor, gent: torch.Tensor | None) -> None:
    if col_limit == 0:  # a TP shard that is all vocabulary padding
        z.zero_()
        return
    dz = z[:, :col_limit].to(torch.float32, copy=True).sub_(lse[:, None])  # z - lse
    p = torch.exp(dz)
    if ent is not None:  # -(glp + gent (H + z - lse)) p
        dz.add_(ent[:, None]).mul_(gent[:, None]).add_(glp[:, None]).mul_(p).neg_()
    else:  # -glp p
        dz = p.mul_(-glp[:, None])
    del p
    local = tgt - vocab_start
    owned = (local >= 0) & (local < col_limit)
    dz.scatter_add_(1, torch.where(owned, local, 0)[:, None], torch.where(owned, glp, 0.0)[:, None])
    z[:, :col_limit] = dz
    z[:, col_limit:] = 0


_ENGINE_OPS = {"triton": (_stats_triton, _grad_triton), "torch": (_stats_torch, _grad_torch)}


# --------------------------------------------------------------------------------------------
# Validation, planning and the chunk loop (shared by both entry points)
# --------------------------------------------------------------------------------------------


def _validate(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
              vocab_limit: int | None, tp_group, dtypes: tuple[torch.dtype, ...]) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V_local, H], got shape {tuple(weight.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"targets must be [T], got shape {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows but hidden has {hidden.shape[0]}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 token ids, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.dtype not in dtypes:
        raise ValueError(f"dtype {hidden.dtype} not supported (expected one of {dtypes})")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"devices differ: hidden {hidden.device}, weight {weight.device}, targets {targets.device}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    if vocab_limit is not None and (not isinstance(vocab_limit, int) or vocab_limit <= 0
                                    or (tp_group is None and vocab_limit <= vocab_start)):
        raise ValueError(f"vocab_limit must be an int above vocab_start={vocab_start} (the number of real "
                         f"vocabulary entries), got {vocab_limit!r}")
    if targets.numel() and not _is_fake(targets):
        # Without TP the whole vocab is here, so an out-of-range id is a caller bug (it would
        # silently give logp = -lse). One host sync; with TP only the global limit is known.
        hi = vocab_start + weight.shape[0] if tp_group is None else None
        if vocab_limit is not None:
            hi = vocab_limit if hi is None else min(hi, vocab_limit)
        lo = vocab_start if tp_group is None else 0
        real = targets != IGNORE_INDEX
        bad = real & (targets < lo) if hi is None else real & ((targets < lo) | (targets >= hi))
        if bool(bad.any()):
            raise ValueError(f"targets outside [{lo}, {hi if hi is not None else 'vocab'}) "
                             f"(other than {IGNORE_INDEX}): {targets[bad][:8].tolist()}")


def _tp_active(tp_group) -> bool:
    return tp_group is not None and dist.get_world_size(tp_group) > 1


def _pick_engine(engine: str, device: torch.device) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "triton" if device.type == "cuda" or _interpreting() else "torch"
    if engine == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError("engine='triton' got CPU tensors but Triton is not in interpreter mode: set "
                         "TRITON_INTERPRET=1 before triton is imported, or use engine='torch'")
    return engine


def _row_bytes(engine: str, v_local: int, dtype: torch.dtype) -> int:
    """Bytes one row of a chunk costs: its logits, plus on the torch engine the fp32 temporaries
    of its row operations (two fp32 rows: the shifted logits and their exponential)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return v_local * (itemsize + (8 if engine == "torch" else 0))


@dataclass
class ChunkPlan:
    """What the chunk loop needs: the rows that count and how to cut them."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    vocab_start: int
    col_limit: int
    tp_group: dist.ProcessGroup | None
    with_entropy: bool
    engine: str
    chunk_rows: int
    rows: torch.Tensor | None  # indices of the rows with a real target; None = all rows

    @property
    def n(self) -> int:
        return self.hidden.shape[0] if self.rows is None else self.rows.numel()

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """(positions among the counted rows, the chunk's hidden rows, its targets)."""
        for start in range(0, self.n, self.chunk_rows):
            pos = slice(start, min(start + self.chunk_rows, self.n))
            if self.rows is None:
                yield pos, _rows(self.hidden, pos), _rows(self.targets, pos)
            else:
                idx = _rows(self.rows, pos)
                yield pos, self.hidden.index_select(0, idx), self.targets.index_select(0, idx)

    def scatter_rows(self, values: torch.Tensor) -> torch.Tensor:
        """[n] over the counted rows -> [T], 0 on the ignored rows."""
        if self.rows is None:
            return values
        out = torch.zeros(self.hidden.shape[0], dtype=values.dtype, device=values.device)
        return out.index_copy_(0, self.rows, values)

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.rows is None else values.index_select(0, self.rows)

    def stash(self, ctx, *extra: torch.Tensor | None) -> None:
        """Keep the plan on ``ctx`` with its input tensors saved the autograd way (version checks,
        no reference cycles), plus ``extra`` saved tensors."""
        ctx.save_for_backward(self.hidden, self.weight, self.targets, *extra)
        ctx.plan = replace(self, hidden=None, weight=None, targets=None)

    @staticmethod
    def unstash(ctx) -> tuple[ChunkPlan, tuple[torch.Tensor | None, ...]]:
        hidden, weight, targets, *extra = ctx.saved_tensors
        return replace(ctx.plan, hidden=hidden, weight=weight, targets=targets), tuple(extra)


def chunk_plan(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_start: int = 0,
               vocab_limit: int | None = None, tp_group: dist.ProcessGroup | None = None, with_entropy: bool = False,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, engine: str = "auto") -> ChunkPlan:
    """Validate the arguments and cut the counted rows into chunks (the arguments are those of
    :func:`fused_linear_logprob`). With ``general_forward/backward`` and ``loss_forward/backward``
    it lets a caller run the passes without autograd (the fake-tensor memory measurement)."""
    _validate(hidden, weight, targets, vocab_start, vocab_limit, tp_group,
              (torch.float32, torch.bfloat16, torch.float16))
    engine = _pick_engine(engine, hidden.device)
    v_local = weight.shape[0]
    per_row = _row_bytes(engine, v_local, weight.dtype)
    if not isinstance(chunk_bytes, int) or chunk_bytes < per_row:
        raise ValueError(f"chunk_bytes={chunk_bytes!r} is smaller than one row of logits ({v_local} vocab "
                         f"entries x {per_row // v_local} bytes = {per_row} bytes on the {engine} engine): raise it")
    col_limit = v_local if vocab_limit is None else max(0, min(v_local, vocab_limit - vocab_start))
    rows = None
    if not _is_fake(targets):  # fake tensors have no values: every row counts (the worst case)
        real = targets != IGNORE_INDEX
        if not bool(real.all()):
            rows = real.nonzero().squeeze(1)
    return ChunkPlan(hidden, weight, targets.contiguous(), vocab_start, col_limit, tp_group, with_entropy, engine,
                 chunk_rows=max(1, chunk_bytes // per_row), rows=rows)


def _chunk_logits(plan: ChunkPlan, h: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """z = h @ W.T for one chunk, by the platform matmul, into the reused buffer."""
    z = buf.narrow(0, 0, h.shape[0])
    torch.mm(h, plan.weight.t(), out=z)
    return z


def _combine(plan: ChunkPlan, st: _RowStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row statistics of this shard -> global (lse, logp, entropy), as megatron's
    vocab-parallel cross-entropy combines them; [n]-sized all-reduces only."""
    m, s, ez, zt = st.m, st.s, st.ez, st.zt
    if _tp_active(plan.tp_group):
        big_m = m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=plan.tp_group)
        has = s > 0  # a shard that is all vocabulary padding has m = -inf, s = 0
        scale = torch.where(has, torch.exp(m - big_m), 0.0)
        parts = [s * scale, zt] + ([torch.where(has, scale * (ez + (m - big_m) * s), 0.0)] if ez is not None else [])
        packed = torch.stack(parts)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=plan.tp_group)
        m, s, zt = big_m, packed[0], packed[1]
        ez = packed[2] if ez is not None else None
    log_s = torch.log(s)
    lse = m + log_s
    entropy = log_s - ez / s if ez is not None else None
    return lse, zt - lse, entropy


@dataclass
class _WeightGrad:
    """Where dW accumulates: megatron's fp32 ``main_grad`` (returned to autograd as None, the
    DDP hook of a tied embedding still adds that path's own gradient), or an fp32 buffer that
    becomes the returned gradient (no main_grad: plain torch use)."""

    target: torch.Tensor
    into_main_grad: bool

    @classmethod
    def for_weight(cls, weight: torch.Tensor) -> _WeightGrad:
        main = getattr(weight, "main_grad", None)
        if main is not None:
            if main.shape != weight.shape or main.dtype != torch.float32:
                raise ValueError(f"weight.main_grad must be fp32 {tuple(weight.shape)}, got {main.dtype} "
                                 f"{tuple(main.shape)}")
            return cls(main, True)
        return cls(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device), False)

    def as_grad(self, weight: torch.Tensor) -> torch.Tensor | None:
        if self.into_main_grad:
            return None
        return self.target if weight.dtype == torch.float32 else self.target.to(weight.dtype)


def _accumulate_wgrad(target: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, slice_bytes: int) -> None:
    """target (fp32 [V, H]) += dz.T @ h, with dz, h in the weight's dtype: one GEMM that
    accumulates in fp32 straight into the target where the platform has it."""
    global LAST_WGRAD_PATH
    if dz.dtype == torch.float32:
        torch.addmm(target, dz.t(), h, out=target)
        LAST_WGRAD_PATH = "fp32"
        return
    if target.device.type == "cuda":
        if _is_fake(target):
            # shapes only (the memory measurement): cuBLAS accumulates in place, allocating
            # nothing; torch's fake-tensor rule for this overload would allocate a [V, H] result
            LAST_WGRAD_PATH = "addmm_out_dtype"
            return
        try:
            torch.addmm(target, dz.t(), h, out_dtype=torch.float32, out=target)
            LAST_WGRAD_PATH = "addmm_out_dtype"
            return
        except (RuntimeError, TypeError):  # torch builds whose fp32-accumulating addmm wants a 16-bit input
            pass
        # bounded temporaries instead: one fp32 [slice, H] product per vocab slice, a quarter of
        # the chunk budget each
        step = max(1, slice_bytes // (16 * h.shape[1]))
        for v0 in range(0, target.shape[0], step):
            n = min(step, target.shape[0] - v0)
            target.narrow(0, v0, n).add_(torch.mm(dz.narrow(1, v0, n).t(), h, out_dtype=torch.float32))
        LAST_WGRAD_PATH = "sliced"
        return
    torch.addmm(target, dz.t().float(), h.float(), out=target)  # CPU: 16-bit GEMMs have no fp32 output here
    LAST_WGRAD_PATH = "cpu_upcast"


def _stats_pass(plan: ChunkPlan) -> _RowStats:
    """Forward statistics of every counted row, chunk by chunk (2 T V H FLOPs)."""
    stats_op = _ENGINE_OPS[plan.engine][0]
    dev = plan.hidden.device
    parts: list[_RowStats] = []
    if plan.n:
        buf = _empty((min(plan.chunk_rows, plan.n), plan.weight.shape[0]), dtype=plan.weight.dtype, device=dev)
        for _, h, tgt in plan.chunks():
            parts.append(stats_op(_chunk_logits(plan, h, buf), tgt, plan.col_limit, plan.vocab_start,
                                  plan.with_entropy))
    if not parts:
        empty = torch.zeros(0, dtype=torch.float32, device=dev)
        return _RowStats(empty, empty, empty if plan.with_entropy else None, empty)
    cat = (lambda xs: torch.cat(xs) if len(xs) > 1 else xs[0])  # noqa: E731
    return _RowStats(cat([p.m for p in parts]), cat([p.s for p in parts]),
                     cat([p.ez for p in parts]) if plan.with_entropy else None, cat([p.zt for p in parts]))


def _grad_pass(plan: ChunkPlan, lse: torch.Tensor, ent: torch.Tensor | None, glp: torch.Tensor,
               gent: torch.Tensor | None, dh: torch.Tensor | None, dw: _WeightGrad | None,
               chunk_bytes: int) -> None:
    """Recompute each chunk's logits, turn them into dL/dz in place, then dh and dW by matmul."""
    grad_op = _ENGINE_OPS[plan.engine][1]
    if not plan.n:
        return
    buf = _empty((min(plan.chunk_rows, plan.n), plan.weight.shape[0]), dtype=plan.weight.dtype,
                 device=plan.hidden.device)
    for pos, h, tgt in plan.chunks():
        z = _chunk_logits(plan, h, buf)
        grad_op(z, tgt, plan.col_limit, plan.vocab_start, _rows(lse, pos), None if ent is None else _rows(ent, pos),
                _rows(glp, pos), None if gent is None else _rows(gent, pos))
        _chunk_input_grads(plan, pos, z, h, dh, dw, chunk_bytes)


def _chunk_input_grads(plan: ChunkPlan, pos: slice, dz: torch.Tensor, h: torch.Tensor, dh: torch.Tensor | None,
                       dw: _WeightGrad | None, chunk_bytes: int) -> None:
    if dh is not None:
        if plan.rows is None:
            torch.mm(dz, plan.weight, out=_rows(dh, pos))
        else:
            dh.index_copy_(0, _rows(plan.rows, pos), torch.mm(dz, plan.weight))
    if dw is not None:
        _accumulate_wgrad(dw.target, dz, h, chunk_bytes)


def _row_grads(plan: ChunkPlan, g_logp: torch.Tensor | None, g_ent: torch.Tensor | None):
    """The incoming gradients on the counted rows (float32, contiguous). An entropy that no loss
    used (computed for a metric) has no gradient: None, and the gradient kernel skips its term."""
    glp = (plan.gather_rows(g_logp).float() if g_logp is not None
           else torch.zeros(plan.n, dtype=torch.float32, device=plan.hidden.device))
    gent = plan.gather_rows(g_ent).float().contiguous() if plan.with_entropy and g_ent is not None else None
    return glp.contiguous(), gent


# --------------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------------


def _new_dh(plan: ChunkPlan) -> torch.Tensor:
    # ignored rows get no gradient: zeros unless every row is computed (then all are written)
    alloc = torch.zeros if plan.rows is not None else _empty
    return alloc(plan.hidden.shape, dtype=plan.hidden.dtype, device=plan.hidden.device)


def general_forward(plan: ChunkPlan) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``fused_linear_logprob``'s forward: (logp [T], entropy [T] or None, and for the backward
    lse [n], entropy [n] of the counted rows)."""
    lse, logp, entropy = _combine(plan, _stats_pass(plan))
    return (plan.scatter_rows(logp), plan.scatter_rows(entropy) if plan.with_entropy else None, lse, entropy)


def general_backward(plan: ChunkPlan, lse: torch.Tensor, entropy: torch.Tensor | None, g_logp: torch.Tensor | None,
                     g_ent: torch.Tensor | None, *, need_dh: bool, need_dw: bool,
                     chunk_bytes: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Its backward: recompute, gradient in place, dh and dW; returns (dh, the weight's gradient,
    None when it went into ``main_grad``)."""
    glp, gent = _row_grads(plan, g_logp, g_ent)
    dh = _new_dh(plan) if need_dh else None
    dw = _WeightGrad.for_weight(plan.weight) if need_dw else None
    _grad_pass(plan, lse, entropy if gent is not None else None, glp, gent, dh, dw, chunk_bytes)
    return dh, None if dw is None else dw.as_grad(plan.weight)


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, plan: ChunkPlan, chunk_bytes: int):
        logp, entropy, lse, ent_rows = general_forward(plan)
        ctx.chunk_bytes = chunk_bytes
        plan.stash(ctx, lse, ent_rows)
        return (logp, entropy) if plan.with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        plan, (lse, entropy) = ChunkPlan.unstash(ctx)
        dh, dw = general_backward(plan, lse, entropy, g_logp, g_ent, need_dh=ctx.needs_input_grad[0],
                                  need_dw=ctx.needs_input_grad[1], chunk_bytes=ctx.chunk_bytes)
        return dh, dw, None, None, None


#: ``token_loss(logp [n], entropy [n] or None, rows [n]) -> 0-dim loss`` of one chunk's tokens;
#: ``rows`` are their indices into ``[T]``. The total loss is the sum over chunks.
TokenLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass
class LossPass:
    """What ``fused_linear_logprob_loss``'s single pass leaves: the loss, the detached log-probs,
    the gradients it computed (for an incoming gradient of 1) and what a correction pass needs."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None
    dh: torch.Tensor | None
    dw: _WeightGrad | None
    lse: torch.Tensor
    ent_rows: torch.Tensor | None
    glp: torch.Tensor
    gent: torch.Tensor | None


def _chunk_loss_grads(token_loss: TokenLoss, logp: torch.Tensor, ent: torch.Tensor | None, rows: torch.Tensor):
    """The chunk's loss and its gradient in each row's log-prob and entropy (float32, contiguous:
    the gradient of a sum can be an expanded, stride-0 tensor)."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        en = ent.detach().requires_grad_(True) if ent is not None else None
        loss = token_loss(lp, en, rows)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise ValueError(f"token_loss must return a 0-dim tensor, got {type(loss).__name__} "
                             f"{tuple(getattr(loss, 'shape', ()))}")
        wrt = [lp] + ([en] if en is not None else [])
        grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    glp = torch.zeros_like(lp) if grads[0] is None else grads[0].detach().float().contiguous()
    gent = None
    if en is not None:
        gent = torch.zeros_like(en) if grads[1] is None else grads[1].detach().float().contiguous()
    return loss.detach().float(), glp, gent


def loss_forward(plan: ChunkPlan, token_loss: TokenLoss, *, want_dh: bool, want_dw: bool, chunk_bytes: int) -> LossPass:
    """``fused_linear_logprob_loss``'s single pass: per chunk logits, statistics, the token loss's
    gradient, the logits' gradient in place, dh and dW."""
    stats_op, grad_op = _ENGINE_OPS[plan.engine]
    dev = plan.hidden.device
    dh = _new_dh(plan) if want_dh else None
    dw = _WeightGrad.for_weight(plan.weight) if want_dw else None
    total = torch.zeros((), dtype=torch.float32, device=dev)
    logps, ents, lses, glps, gents = [], [], [], [], []
    all_rows = torch.arange(plan.hidden.shape[0], device=dev) if plan.rows is None else plan.rows
    if plan.n:
        buf = _empty((min(plan.chunk_rows, plan.n), plan.weight.shape[0]), dtype=plan.weight.dtype, device=dev)
    for pos, h, tgt in plan.chunks():
        z = _chunk_logits(plan, h, buf)
        lse, logp, ent = _combine(plan, stats_op(z, tgt, plan.col_limit, plan.vocab_start, plan.with_entropy))
        loss, glp, gent = _chunk_loss_grads(token_loss, logp, ent, _rows(all_rows, pos))
        total += loss
        logps.append(logp)
        ents.append(ent)
        lses.append(lse)
        glps.append(glp)
        gents.append(gent)
        if want_dh or want_dw:
            grad_op(z, tgt, plan.col_limit, plan.vocab_start, lse, ent, glp, gent)
            _chunk_input_grads(plan, pos, z, h, dh, dw, chunk_bytes)

    def cat(xs):
        return torch.cat(xs) if xs else torch.zeros(0, dtype=torch.float32, device=dev)

    ent_rows = cat(ents) if plan.with_entropy else None
    return LossPass(total, plan.scatter_rows(cat(logps)), plan.scatter_rows(ent_rows) if plan.with_entropy else None,
                    dh, dw, cat(lses), ent_rows, cat(glps), cat(gents) if plan.with_entropy else None)


def loss_backward(plan: ChunkPlan, res: LossPass, g: float,
                  chunk_bytes: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rescale the single pass's gradients by the incoming gradient ``g``; returns (dh, the
    weight's gradient or None when it is in ``main_grad``)."""
    dh = res.dh * g if res.dh is not None and g != 1.0 else res.dh
    grad_w = None
    if res.dw is not None:
        if not res.dw.into_main_grad:
            grad_w = res.dw.as_grad(plan.weight) * g if g != 1.0 else res.dw.as_grad(plan.weight)
        elif g != 1.0:
            # main_grad already holds 1 x this loss's dW (added in the forward); make it g x:
            # one more pass (4 T V H) adds (g - 1) x dW. The usual case, g = 1 (megatron's
            # bf16/fp32 loss scale with calculate_per_token_loss), never comes here.
            _grad_pass(plan, res.lse, res.ent_rows, res.glp * (g - 1.0),
                       None if res.gent is None else res.gent * (g - 1.0), None, res.dw, chunk_bytes)
    return dh, grad_w


class _LinearLogprobLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, plan: ChunkPlan, chunk_bytes: int, token_loss: TokenLoss):
        res = loss_forward(plan, token_loss, want_dh=ctx.needs_input_grad[0], want_dw=ctx.needs_input_grad[1],
                           chunk_bytes=chunk_bytes)
        ctx.chunk_bytes, ctx.dw = chunk_bytes, res.dw
        plan.stash(ctx, res.dh, res.lse, res.ent_rows, res.glp, res.gent)
        outs = (res.logp,) + ((res.entropy,) if plan.with_entropy else ())
        ctx.mark_non_differentiable(*outs)
        return (res.loss,) + outs

    @staticmethod
    def backward(ctx, g_loss, *_):
        plan, (dh, lse, ent_rows, glp, gent) = ChunkPlan.unstash(ctx)
        res = LossPass(g_loss, None, None, dh, ctx.dw, lse, ent_rows, glp, gent)
        dh, grad_w = loss_backward(plan, res, float(g_loss), ctx.chunk_bytes)
        return dh, grad_w, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def fused_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         vocab_start: int = 0, vocab_limit: int | None = None,
                         tp_group: dist.ProcessGroup | None = None, with_entropy: bool = False,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                         engine: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` under ``softmax(hidden @ weight.T)``, one chunk of
    logits at a time.

    Args:
        hidden: [T, H] fp32 / bf16 / fp16, identical on every TP rank.
        weight: [V_local, H], same dtype; this rank's vocab shard, i.e. rows
            ``vocab_start .. vocab_start + V_local - 1`` of the global output embedding. When it
            carries megatron's fp32 ``main_grad``, its gradient is accumulated there (and autograd
            gets None for it).
        targets: [T] int64 global token ids; -100 marks ignored rows.
        vocab_start: first global vocab id of this shard.
        vocab_limit: the number of real vocabulary entries; ids at or above it (the padding a
            vocab-parallel embedding adds) are left out of the softmax. None: no padding.
        tp_group: TP process group the vocab is split over (None: the whole vocab is local).
        with_entropy: also return the entropy of the full (global) softmax per row.
        chunk_bytes: memory budget of one chunk of logits (plus, on the torch engine, its fp32
            temporaries); the chunk has ``chunk_bytes // bytes-per-row`` rows.
        engine: ``triton`` (the kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``torch``
            (torch ops per chunk), ``auto`` (triton where it can run, else torch).

    Returns:
        ``logp`` [T] float32, or ``(logp, entropy)``. Ignored rows are 0 in both and get no gradient.

    Gradients: ``hidden`` gets only this rank's LOCAL contribution ``dz_local @ W_local``, NOT
    all-reduced: as with megatron's ColumnParallelLinear, the caller feeds ``hidden`` through
    ``copy_to_tensor_model_parallel_region`` (or the sequence-parallel all-gather), whose backward
    sums the contributions over the TP group. The backward recomputes each chunk's logits
    (``8 T V H`` FLOPs in all; see ``fused_linear_logprob_loss`` for ``6 T V H``).
    """
    plan = chunk_plan(hidden, weight, targets, vocab_start=vocab_start, vocab_limit=vocab_limit, tp_group=tp_group,
                 with_entropy=bool(with_entropy), chunk_bytes=chunk_bytes, engine=engine)
    return _LinearLogprob.apply(hidden, weight, targets, plan, chunk_bytes)


def fused_linear_logprob_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              token_loss: TokenLoss, *, vocab_start: int = 0, vocab_limit: int | None = None,
                              tp_group: dist.ProcessGroup | None = None, with_entropy: bool = False,
                              chunk_bytes: int = DEFAULT_CHUNK_BYTES, engine: str = "auto",
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A loss that is a sum over tokens of a function of each token's log-prob (and entropy),
    with forward and backward in one chunked pass: exactly ``6 T V H`` FLOPs.

    ``token_loss(logp, entropy, rows)`` gets one chunk's float32 ``logp`` [n] and ``entropy`` [n]
    (None without ``with_entropy``) of the rows ``rows`` [n] (indices into ``[T]``, ignored rows
    left out) and returns that chunk's share of the loss as a 0-dim tensor, differentiable in
    ``logp`` and ``entropy`` (e.g. ``-(advantages[rows] * logp).sum() / n_tokens``). Its gradient
    is taken per chunk, so it must not couple rows of different chunks.

    Returns ``(loss, logp [T], entropy [T] or None)``; only ``loss`` is differentiable (in
    ``hidden`` and ``weight``), the log-probs are detached values for metrics. Arguments otherwise
    as :func:`fused_linear_logprob`, TP included (the loss comes out the same on every rank).

    The gradients are computed in the forward, for an incoming loss gradient of 1; the backward
    rescales ``dh`` by the actual one. With ``weight.main_grad`` the weight gradient is already
    accumulated there by the forward; an incoming gradient other than 1 (fp16 loss scaling) costs
    one extra recompute pass to correct it.
    """
    if not callable(token_loss):
        raise ValueError(f"token_loss must be callable, got {type(token_loss).__name__}")
    plan = chunk_plan(hidden, weight, targets, vocab_start=vocab_start, vocab_limit=vocab_limit, tp_group=tp_group,
                 with_entropy=bool(with_entropy), chunk_bytes=chunk_bytes, engine=engine)
    out = _LinearLogprobLoss.apply(hidden, weight, targets, plan, chunk_bytes, token_loss)
    return out[0], out[1], out[2] if with_entropy else None


class _AllReduceSumForward(torch.autograd.Function):
    """All-reduce SUM in forward, identity in backward. The loss downstream is replicated on every
    TP rank, so each rank already holds dL/d(global sum) and that is also dL/d(its own term);
    torch.distributed.nn's all_reduce would sum the replicated gradients (x world size)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def linear_logprob_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             vocab_start: int = 0, vocab_limit: int | None = None,
                             tp_group: dist.ProcessGroup | None = None,
                             with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Readable definition (materialises the [T, V_local] logits), autograd-differentiable: the
    "materialised path" the benchmark compares against.

    Computes in float64 for float64 inputs, else float32. With ``tp_group`` it combines the shards
    exactly like megatron's vocab-parallel cross-entropy; the max is detached (the log-sum-exp does
    not depend on it) and the sums use an all-reduce whose backward is the identity, so
    ``hidden.grad`` is this rank's LOCAL contribution, as in ``fused_linear_logprob``.
    Returns ``logp`` [T], or ``(logp, entropy)``; rows with target -100 give 0 and no gradient.
    """
    _validate(hidden, weight, targets, vocab_start, vocab_limit, tp_group,
              (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    tp = _tp_active(tp_group)
    z = hidden.to(dtype) @ weight.to(dtype).T
    if vocab_limit is not None:  # the padding columns are not part of the softmax
        z = z[:, : max(0, min(weight.shape[0], vocab_limit - vocab_start))]
    local = targets - vocab_start
    owned = (local >= 0) & (local < z.shape[1])
    if z.shape[1]:
        zt = torch.where(owned, z.gather(1, torch.where(owned, local, 0)[:, None]).squeeze(1), 0.0)
        m = z.detach().amax(dim=1)
    else:  # a TP shard that is all padding
        zt = z.sum(dim=1)
        m = torch.full_like(zt.detach(), float("-inf"))
    if tp:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    e = torch.exp(z - m[:, None])
    s = e.sum(dim=1)
    ez = (e * (z - m[:, None])).sum(dim=1)
    if tp:
        s = _AllReduceSumForward.apply(s, tp_group)
        ez = _AllReduceSumForward.apply(ez, tp_group)
        zt = _AllReduceSumForward.apply(zt, tp_group)
    valid = targets != IGNORE_INDEX
    logp = torch.where(valid, zt - (m + torch.log(s)), 0.0)
    if not with_entropy:
        return logp
    entropy = torch.where(valid, torch.log(s) - ez / s, 0.0)
    return logp, entropy
