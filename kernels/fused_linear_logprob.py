"""Fused LM head -> per-token log-prob (+ entropy), without materialising the logits.

What: ``fused_linear_logprob(hidden, weight, targets)`` returns ``log softmax(hidden @ weight.T)``
at the target ids (and optionally the entropy of that softmax) for a vocab-parallel LM head,
together with gradients for ``hidden`` and ``weight``. ``linear_logprob_reference`` next to it is
the readable pure-torch definition (and the CPU fallback).

Why: RL post-training needs only the log-prob of the sampled token (and the entropy) per
position, but the plain route materialises ``[T, V]`` logits, and in fp32 that is huge: T=64K
tokens x V=151936 (Qwen3 vocab) x 4 bytes = 40 GB, plus as much again for their gradient. The
Triton kernels here keep only ``[BLOCK_T, BLOCK_V]`` tiles: per block of rows they sweep the vocab,
build each logit tile with ``tl.dot`` (fp32 accumulation over H) and fold it into an online
log-sum-exp (running max ``m``, running sum ``s``), the target logit and an entropy accumulator.
Backward recomputes the tiles instead of storing them (the usual FLOPs-for-memory trade).

The [T]-sized statistics are combined into logp / entropy by a few torch ops after the kernel.
Tensor parallelism follows megatron's vocab-parallel cross-entropy: each rank holds rows
``vocab_start .. vocab_start + V_local - 1`` of the vocab and computes per-row statistics for its
shard; these are combined with all-reduces (MAX of ``m``, SUM of rescaled ``s``, SUM of the target
logit which only the owning rank contributes), so every rank ends with the global log-prob.

``targets == IGNORE_INDEX`` (-100) rows get logp 0 and entropy 0 and receive no gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

IGNORE_INDEX = -100

# fp32 inputs use IEEE fp32 dots: TF32 (Triton's default on Ampere+) would cost ~1e-3 relative error
# on the logits and break the fp32-vs-float64 test tolerances. Set to "tf32" to trade accuracy for
# speed. bf16/fp16 inputs always use the native tensor-core dot.
FP32_DOT_PRECISION = "ieee"


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (all >= 16, powers of two, for tl.dot) and launch parameters."""

    t: int = 64
    v: int = 128
    h: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Module-level so tests (and tuning) can swap it with monkeypatch; small tiles exercise the masks.
BLOCKS = Blocks()


def _empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here, uninitialised. Tests monkeypatch this to fill
    NaN, so an element a kernel forgets to write shows up in the comparison."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST is set only under the Triton interpreter for
    bf16: it stores bf16 as raw uint16 and its dot multiplies those bit patterns (triton 3.9).
    bf16 -> fp32 is exact, so this matches the GPU's bf16 dot up to summation order."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, T, V, H,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """z[rows, cols] = hidden[rows] @ weight[cols].T as a [BLOCK_T, BLOCK_V] fp32 tile.
    Out-of-range rows/cols come out as 0 (masked loads); callers mask them afterwards."""
    row_ok = rows < T
    col_ok = cols < V
    # int64 offsets: V_local * H can exceed 2**31 (151936 * 16384)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * H
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * H
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        x = tl.load(h_rows + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        # weight tile loaded already transposed, [BLOCK_H, BLOCK_V], so no tl.trans is needed
        wt = tl.load(w_cols + hs[:, None], mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(x, wt, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, ez_ptr, zt_ptr, T, V, H, vocab_start,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Per row of this rank's shard: m = max z, s = sum exp(z - m), ez = sum exp(z - m) * (z - m)
    and zt = z[target] (0 when the target is not in this shard)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    local = tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - vocab_start
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    ez = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logit_tile(h_ptr, w_ptr, rows, cols, T, V, H, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # every vocab block has >= 1 valid column, so m_new is finite from the first block on
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first block (m = -inf)
        e = tl.exp(z - m_new[:, None])  # masked columns: exp(-inf) = 0
        if WITH_ENTROPY:
            # Entropy accumulator kept relative to the running max (sum e * (z - m), not
            # sum e * z): entropy = log S - ez / S then has no cancellation between two ~|z|
            # sized terms. Rebasing to m_new: sum e'(z - m_new) = alpha * (ez + (m - m_new) * s).
            zrel = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
            # before the first block m = -inf and s = 0: zero the shift so -inf * 0 never happens
            shift = tl.where(s > 0, m - m_new, 0.0)
            ez = alpha * (ez + shift * s) + tl.sum(e * zrel, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        # col_ok matters: a target owned by the next rank can equal a padded column index
        hit = (cols[None, :] == local[:, None]) & col_ok[None, :]
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m = m_new
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)
    tl.store(zt_ptr + rows, zt, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ez_ptr + rows, ez, mask=row_ok)


@triton.jit
def _dlogits(z, cols, col_ok, local, lse, ent, glp, gent, WITH_ENTROPY: tl.constexpr):
    """dL/dz for a tile: glp * (1[j == t] - p_j) + gent * p_j * (E[z] - z_j), with
    E[z] - z_j = -(entropy + z_j - lse), so only lse and entropy are needed (both global)."""
    zc = z - lse[:, None]
    p = tl.where(col_ok[None, :], tl.exp(zc), 0.0)
    hit = (cols[None, :] == local[:, None]) & col_ok[None, :]
    dz = glp[:, None] * (tl.where(hit, 1.0, 0.0) - p)
    if WITH_ENTROPY:
        dz -= gent[:, None] * p * (ent[:, None] + zc)
    return dz


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dh_ptr,
                   T, V, H, vocab_start,
                   BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """grad_hidden[rows] = sum over vocab blocks of dz_tile @ W_tile, in fp32 (dh_ptr).
    One program owns a block of rows, so the accumulation is deterministic without atomics."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    local = tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - vocab_start
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)  # 0 on padded rows => dz = 0
    ent = tl.zeros((BLOCK_T,), dtype=tl.float32)
    gent = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if WITH_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * H
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logit_tile(h_ptr, w_ptr, rows, cols, T, V, H, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        dz = _dlogits(z, cols, col_ok, local, lse, ent, glp, gent, WITH_ENTROPY)
        dz = dz.to(w_ptr.dtype.element_ty)  # tensor-core dot for bf16; fp32 stays fp32
        w_cols = w_ptr + cols.to(tl.int64)[:, None] * H
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            w = tl.load(w_cols + hs[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
            out_mask = row_ok[:, None] & h_ok[None, :]
            # the first vocab block starts from 0 rather than reading the (uninitialised) buffer
            acc = tl.load(dh_rows + hs[None, :], mask=out_mask & (v0 > 0), other=0.0)
            acc = _mma(dz, w, acc, PRECISION, UPCAST)
            tl.store(dh_rows + hs[None, :], acc, mask=out_mask)
        # the next vocab block re-reads what this one stored, possibly from other threads
        tl.debug_barrier()


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dw_ptr,
                   T, V, H, vocab_start,
                   BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """grad_weight[cols] = sum over row blocks of dz_tile.T @ hidden_tile, in fp32 (dw_ptr).
    One program owns a block of vocab rows: deterministic, no atomics."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    dw_cols = dw_ptr + cols.to(tl.int64)[:, None] * H
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        local = tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - vocab_start
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.zeros((BLOCK_T,), dtype=tl.float32)
        gent = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if WITH_ENTROPY:
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        z = _logit_tile(h_ptr, w_ptr, rows, cols, T, V, H, BLOCK_T, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        dz = _dlogits(z, cols, col_ok, local, lse, ent, glp, gent, WITH_ENTROPY)
        dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))  # [BLOCK_V, BLOCK_T]
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * H
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            x = tl.load(h_rows + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            out_mask = col_ok[:, None] & h_ok[None, :]
            acc = tl.load(dw_cols + hs[None, :], mask=out_mask & (t0 > 0), other=0.0)
            acc = _mma(dzt, x, acc, PRECISION, UPCAST)
            tl.store(dw_cols + hs[None, :], acc, mask=out_mask)
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# Python side
# --------------------------------------------------------------------------------------------


def _validate(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_start: int,
              tp_group, dtypes: tuple[torch.dtype, ...]) -> None:
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
    if tp_group is None and targets.numel():
        # Without TP the whole vocab is here, so an out-of-range id is a caller bug (it would
        # silently give logp = -lse). Costs one host sync; with TP the global range is not known.
        bad = (targets != IGNORE_INDEX) & ((targets < vocab_start) | (targets >= vocab_start + weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"targets outside [{vocab_start}, {vocab_start + weight.shape[0]}) "
                             f"(other than {IGNORE_INDEX}): {targets[bad][:8].tolist()}")


def _tp_active(tp_group) -> bool:
    return tp_group is not None and dist.get_world_size(tp_group) > 1


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
                             vocab_start: int = 0, tp_group: dist.ProcessGroup | None = None,
                             with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Readable definition (materialises the [T, V_local] logits), autograd-differentiable.

    Computes in float64 for float64 inputs, else float32. With ``tp_group`` it combines the shards
    exactly like megatron's vocab-parallel cross-entropy; the max is detached (the log-sum-exp does
    not depend on it) and the sums use an all-reduce whose backward is the identity, so
    ``hidden.grad`` is this rank's LOCAL contribution, as in ``fused_linear_logprob``.
    Returns ``logp`` [T], or ``(logp, entropy)``; rows with target -100 give 0 and no gradient.
    """
    _validate(hidden, weight, targets, vocab_start, tp_group,
              (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    tp = _tp_active(tp_group)
    z = hidden.to(dtype) @ weight.to(dtype).T
    local = targets - vocab_start
    owned = (local >= 0) & (local < weight.shape[0])
    zt = torch.where(owned, z.gather(1, torch.where(owned, local, 0)[:, None]).squeeze(1), 0.0)
    m = z.detach().amax(dim=1)
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


def _launch_args(hidden: torch.Tensor):
    b = BLOCKS
    # input_precision only changes fp32 dots; 16-bit operands get the tensor-core dot either way
    precision = FP32_DOT_PRECISION if hidden.dtype == torch.float32 else "tf32"
    upcast = _interpreting() and hidden.dtype == torch.bfloat16  # see _mma
    return b, dict(BLOCK_T=b.t, BLOCK_V=b.v, BLOCK_H=b.h, PRECISION=precision, UPCAST=upcast,
                   num_warps=b.num_warps, num_stages=b.num_stages)


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, tp_group, with_entropy):
        T, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        m = _empty((T,), dtype=torch.float32, device=dev)
        s = _empty((T,), dtype=torch.float32, device=dev)
        zt = _empty((T,), dtype=torch.float32, device=dev)
        ez = _empty((T,), dtype=torch.float32, device=dev) if with_entropy else s  # s: unused dummy
        b, kw = _launch_args(hidden)
        if T:
            _fwd_kernel[_grid(T, b.t)](hidden, weight, targets, m, s, ez, zt, T, V, H,
                                                vocab_start, WITH_ENTROPY=with_entropy, **kw)
        if _tp_active(tp_group):
            # megatron's vocab-parallel combine, on [T]-sized statistics only
            M = m.clone()
            dist.all_reduce(M, op=dist.ReduceOp.MAX, group=tp_group)
            scale = torch.exp(m - M)
            parts = [s * scale, zt] + ([scale * (ez + (m - M) * s)] if with_entropy else [])
            packed = torch.stack(parts)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
            m, s, zt = M, packed[0], packed[1]
            if with_entropy:
                ez = packed[2]
        valid = targets != IGNORE_INDEX
        log_s = torch.log(s)
        lse = m + log_s
        logp = torch.where(valid, zt - lse, 0.0)
        entropy = torch.where(valid, log_s - ez / s, 0.0) if with_entropy else None
        ctx.vocab_start = vocab_start
        ctx.with_entropy = with_entropy
        # Backward needs lse and, for the entropy term, E[z]; it uses E[z] - z = -(entropy + z - lse)
        # so the (already computed) entropy is saved instead of E[z] (no |z|-sized cancellation).
        if with_entropy:
            ctx.save_for_backward(hidden, weight, targets, lse, entropy)
            return logp, entropy
        ctx.save_for_backward(hidden, weight, targets, lse)
        return logp

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, targets, lse, *rest = ctx.saved_tensors
        T, H = hidden.shape
        V = weight.shape[0]
        valid = targets != IGNORE_INDEX
        # ignored rows get no gradient, whatever the upstream says
        glp = torch.where(valid, grads[0].float(), 0.0).contiguous()
        if ctx.with_entropy:
            ent = rest[0]
            gent = torch.where(valid, grads[1].float(), 0.0).contiguous()
        else:
            ent = gent = glp  # unused dummies (WITH_ENTROPY=False)
        b, kw = _launch_args(hidden)
        args = (hidden, weight, targets, lse, ent, glp, gent)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            dh = _empty((T, H), dtype=torch.float32, device=hidden.device)
            if T:
                _bwd_dh_kernel[_grid(T, b.t)](*args, dh, T, V, H, ctx.vocab_start,
                                                       WITH_ENTROPY=ctx.with_entropy, **kw)
            grad_hidden = dh.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            dw = _empty((V, H), dtype=torch.float32, device=weight.device)
            if T:
                _bwd_dw_kernel[_grid(V, b.v)](*args, dw, T, V, H, ctx.vocab_start,
                                                       WITH_ENTROPY=ctx.with_entropy, **kw)
            else:
                dw.zero_()
            grad_weight = dw.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _grid(n: int, block: int) -> tuple[int]:
    """Number of programs covering n items; a seam for the test that proves a skipped block shows."""
    return (triton.cdiv(n, block),)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         vocab_start: int = 0, tp_group: dist.ProcessGroup | None = None,
                         with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` under ``softmax(hidden @ weight.T)``, never building
    the [T, V] logits.

    Args:
        hidden: [T, H] fp32 / bf16 / fp16, identical on every TP rank.
        weight: [V_local, H], same dtype; this rank's vocab shard, i.e. rows
            ``vocab_start .. vocab_start + V_local - 1`` of the global output embedding.
        targets: [T] int64 global token ids; -100 marks ignored rows.
        vocab_start: first global vocab id of this shard.
        tp_group: TP process group the vocab is split over (None: the whole vocab is local).
        with_entropy: also return the entropy of the full (global) softmax per row.

    Returns:
        ``logp`` [T] float32, or ``(logp, entropy)``. Ignored rows are 0 in both and get no gradient.

    Gradients: ``weight`` gets this shard's gradient. ``hidden`` gets only this rank's LOCAL
    contribution ``dz_local @ W_local``, NOT all-reduced: as with megatron's ColumnParallelLinear,
    the caller feeds ``hidden`` through ``copy_to_tensor_model_parallel_region`` (or the sequence
    parallel all-gather), whose backward sums the contributions over the TP group.

    Non-contiguous inputs are copied contiguous. On CPU without ``TRITON_INTERPRET=1`` Triton
    cannot run, so this falls back to ``linear_logprob_reference`` (which materialises the logits).
    """
    _validate(hidden, weight, targets, vocab_start, tp_group, (torch.float32, torch.bfloat16, torch.float16))
    if hidden.device.type == "cpu" and not _interpreting():
        return linear_logprob_reference(hidden, weight, targets, vocab_start=vocab_start,
                                        tp_group=tp_group, with_entropy=with_entropy)
    return _FusedLinearLogprob.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                     vocab_start, tp_group, bool(with_entropy))
