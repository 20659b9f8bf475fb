"""Token-level policy-gradient loss (PPO / DAPO / dual-clip / GSPO + KL-to-reference), fused in Triton.

Two functions with the same signature and return value live side by side:

* :func:`policy_loss_reference`: pure torch, differentiated by autograd. It is the spec (it follows
  verl's ``compute_policy_loss`` / ``kl_penalty`` formulas) and the test oracle.
* :func:`fused_policy_loss`: an ``autograd.Function`` whose forward is ONE Triton pass over the
  flattened ``[B*T]`` tokens that, per token, computes the loss term AND ``d loss / d logp``, plus
  per-program partial statistics. The backward only multiplies the saved gradient by ``grad_output``.

Why fused: the torch version launches ~10-20 elementwise kernels (sub, clamp, exp, two products,
clamp, maximum, where, the KL chain, the masked sums of every statistic), each reading and writing a
``[B, T]`` tensor, and autograd stores several of those intermediates for the backward, which is
another ~10 kernels. The fused kernel reads each input once, writes the ``[B, T]`` gradient once
(in ``logp``'s dtype, the only tensor kept for the backward) and a ``[num_programs, K]`` fp32
partials buffer that torch reduces afterwards (deterministic: a fixed reduction tree, no atomics).

Aggregation (token-mean, seq-mean-token-mean, ...) is the caller's business: it passes
``row_scale[b]``, the weight of every token of row ``b`` (e.g. ``1 / global_tokens``), and the loss
is ``sum_{b,t} mask * row_scale[b] * L[b, t]``. The statistics are LOCAL sums over masked-in tokens
(the caller normalises and all-reduces them).

Masked-out tokens contribute exactly 0 to the loss, statistics and gradient (selected with ``where``,
not multiplied by the mask, so garbage or non-finite padding values cannot leak in the forward).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["policy_loss_reference", "fused_policy_loss", "sequence_log_ratio", "kl_reference", "STAT_NAMES", "KL_KINDS"]

# Order of the statistics in the partials buffer (column 0 is the loss itself).
STAT_NAMES: tuple[str, ...] = (
    "tokens", "clipped", "clipped_lower", "neg_log_ratio", "ratio_sum", "ratio_max", "ratio_min", "kl",
)
_NUM_COLS = 1 + len(STAT_NAMES)  # loss + stats
_COL_MAX, _COL_MIN = 1 + STAT_NAMES.index("ratio_max"), 1 + STAT_NAMES.index("ratio_min")
# KL estimator names (verl's), each -> (the kernel's value formula, straight-through k2 gradient?).
# A trailing "+" keeps the estimator's value and takes the gradient of k2 = (logp - ref)^2 / 2,
# i.e. logp - ref (verl's ``kl_penalty``): the expected gradient of k1 or k3 over sampled tokens is
# not the gradient of the KL (for k1 it is zero), k2's is.
_KL_FORMULAS: dict[str, tuple[int, bool]] = {
    "k1": (0, False), "abs": (1, False), "k2": (2, False), "k3": (3, False),
    "k1+": (0, True), "abs+": (1, True), "k3+": (3, True),
}
KL_KINDS: tuple[str, ...] = tuple(_KL_FORMULAS)

BLOCK: int = 1024  # tokens per program
REDUCE_IN_KERNEL_MAX_BLOCKS: int = 8192  # partial rows reduced by one Triton program (8M tokens)
REDUCE_BLOCK_ROWS: int = 256
# triton.jit picks the interpreter at decoration time (this module's import) from this variable
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
_LOG_RATIO_CLAMP = 20.0  # token-mode log-ratio clamp (verl), keeps exp() finite in fp32
_SEQ_LOG_RATIO_MAX = 10.0  # GSPO sequence log-ratio upper clamp (verl)
_KL_DIFF_CLAMP = 20.0  # k3: clamp of (ref - logp) before exp
_KL_VALUE_CLAMP = 10.0  # k3: clamp of the estimate
# (the kernel spells these four numbers as literals; keep them in sync)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an output buffer the kernel fully overwrites (tests monkeypatch this to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _grid(num_blocks: int) -> tuple[int]:
    """Launch grid for ``num_blocks`` token blocks (tests monkeypatch this to prove poisoning works)."""
    return (num_blocks,)


# ----------------------------------------------------------------------------------------------------
# Argument checks (shared by both implementations)
# ----------------------------------------------------------------------------------------------------
def _check_args(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    row_scale: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None,
    seq_log_ratio: torch.Tensor | None, ref_logp: torch.Tensor | None, kl_kind: str,
) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"logp must be floating point, got {logp.dtype}")
    B = logp.shape[0]
    named = {"old_logp": old_logp, "advantages": advantages, "mask": mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    for name, t in named.items():
        if t.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    per_row = {"row_scale": row_scale}
    if seq_log_ratio is not None:
        per_row["seq_log_ratio"] = seq_log_ratio
    for name, t in per_row.items():
        if t.shape != (B,):
            raise ValueError(f"{name} must be [B] = [{B}], got shape {tuple(t.shape)}")
    for name, t in {**named, **per_row}.items():
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device}, logp on {logp.device}")
    for name, c in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not c >= 0.0:  # also rejects NaN; +inf means "no clip on that side"
            raise ValueError(f"{name} must be >= 0 (float('inf') disables clipping), got {c}")
    if dual_clip is not None and not (dual_clip > 1.0 and math.isfinite(dual_clip)):
        raise ValueError(f"dual_clip must be a finite number > 1 (or None), got {dual_clip}")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"unknown kl_kind {kl_kind!r}; expected one of {', '.join(KL_KINDS)}")


# ----------------------------------------------------------------------------------------------------
# Pure-torch reference
# ----------------------------------------------------------------------------------------------------
def kl_reference(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimators, Schulman (2020) "Approximating KL divergence" (verl names).

    ``kind`` ending in ``+`` (``k1+``, ``abs+``, ``k3+``): the value of the named estimator with the
    gradient of ``k2``, ``d/dlogp = logp - ref`` (verl's straight-through ``kl_penalty``)."""
    if kind not in _KL_FORMULAS:
        raise ValueError(f"unknown kl_kind {kind!r}; expected one of {', '.join(KL_KINDS)}")
    x = logp - ref_logp
    base = kind.rstrip("+")
    if base == "k1":  # k1 = log pi - log ref: unbiased, high variance
        value = x
    elif base == "abs":
        value = x.abs()
    elif base == "k2":  # k2 = 0.5 * (log pi - log ref)^2: low variance, biased
        value = 0.5 * x.square()
    else:
        # k3 = r - log r - 1 with r = ref / pi: unbiased, low variance, >= 0 ("low_var_kl"),
        # clamped twice as verl does
        d = torch.clamp(ref_logp - logp, min=-_KL_DIFF_CLAMP, max=_KL_DIFF_CLAMP)
        value = torch.clamp(torch.exp(d) - d - 1, min=-_KL_VALUE_CLAMP, max=_KL_VALUE_CLAMP)
    if not kind.endswith("+"):
        return value
    k2 = 0.5 * x.square()  # straight-through: value of ``value``, gradient of k2
    return k2 + (value - k2).detach()


def _masked_extreme(x: torch.Tensor, keep: torch.Tensor, fill: float, op) -> torch.Tensor:
    filled = torch.where(keep, x, torch.full_like(x, fill)).flatten()
    return op(torch.cat([filled, filled.new_full((1,), fill)]))  # identity element: safe when empty


def policy_loss_reference(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    row_scale: torch.Tensor, *, clip_low: float, clip_high: float, dual_clip: float | None = None,
    seq_log_ratio: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0, kl_kind: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pure-torch policy loss; see :func:`fused_policy_loss` for the arguments and return value."""
    _check_args(logp, old_logp, advantages, mask, row_scale, clip_low, clip_high, dual_clip,
                seq_log_ratio, ref_logp, kl_kind)
    keep = mask != 0
    A = advantages.to(logp.dtype)
    old_logp = old_logp.to(logp.dtype)
    if seq_log_ratio is None:
        # PPO (Schulman et al. 2017) token ratio r = pi / pi_old, log-ratio clamped at +-20 (verl)
        lr = torch.clamp(logp - old_logp, min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP)
    else:
        # GSPO (Zheng et al. 2025): sequence ratio value, per-token gradient 1, clamped at 10 (verl)
        s = seq_log_ratio.detach().to(logp.dtype)[:, None]
        lr = torch.clamp(s + (logp - logp.detach()), max=_SEQ_LOG_RATIO_MAX)
    ratio = torch.exp(lr)
    # clipped surrogate, PPO (Schulman et al. 2017); asymmetric clip_low/clip_high = DAPO's
    # clip-higher (Yu et al. 2025)
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, min=1.0 - clip_low, max=1.0 + clip_high)
    pg_clip = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if dual_clip is not None:
        # dual clip, Ye et al. 2020 "Mastering Complex Control in MOBA Games": bound the loss by
        # -A * c when A < 0
        pg3 = -A * dual_clip
        pg = torch.where(A < 0, torch.minimum(pg_clip, pg3), pg_clip)
        clipped_lower = (A < 0) & (pg_clip > pg3)
    else:
        pg = pg_clip
        clipped_lower = torch.zeros_like(keep)
    L = pg
    if ref_logp is not None and kl_coef != 0.0:
        kl = kl_reference(logp, ref_logp.to(logp.dtype), kl_kind)
        L = pg + kl_coef * kl
    else:
        kl = torch.zeros_like(pg)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    loss = torch.where(keep, row_scale.to(logp.dtype)[:, None] * L, zero).sum()

    def msum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, x.detach().to(torch.float64), 0.0).sum().float()

    with torch.no_grad():
        stats = {
            "tokens": msum(torch.ones_like(pg)),
            "clipped": msum(clipped.to(pg.dtype)),
            "clipped_lower": msum(clipped_lower.to(pg.dtype)),
            "neg_log_ratio": msum(-lr),
            "ratio_sum": msum(ratio),
            "ratio_max": _masked_extreme(ratio, keep, -math.inf, torch.max).float(),
            "ratio_min": _masked_extreme(ratio, keep, math.inf, torch.min).float(),
            "kl": msum(kl),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _policy_loss_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, row_scale_ptr, seq_lr_ptr, ref_ptr,
    grad_ptr, part_ptr,
    n_tokens, T,
    ratio_lo, ratio_hi, dual_clip, kl_coef,
    SEQ_MODE: tl.constexpr, DUAL_CLIP: tl.constexpr, HAS_KL: tl.constexpr, KL_KIND: tl.constexpr,
    KL_ST: tl.constexpr,
    WRITE_GRAD: tl.constexpr, NUM_COLS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_tokens
    row = offs // T
    lp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    keep = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
    rs = tl.load(row_scale_ptr + row, mask=inb, other=0.0).to(tl.float32)

    if SEQ_MODE:
        # GSPO (Zheng et al. 2025): lr = clamp(s_b + (logp - sg(logp)), max=10): value s_b, dlr = 1
        s = tl.load(seq_lr_ptr + row, mask=inb, other=0.0).to(tl.float32)
        lr = tl.minimum(s, 10.0)
        dlr = tl.where(s <= 10.0, 1.0, 0.0)
    else:
        # PPO (Schulman et al. 2017): lr = clamp(logp - old, -20, 20); clamp's gradient is inclusive
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        diff = lp - old
        lr = tl.minimum(tl.maximum(diff, -20.0), 20.0)
        dlr = tl.where((diff >= -20.0) & (diff <= 20.0), 1.0, 0.0)

    ratio = tl.exp(lr)
    # PPO clipped surrogate (Schulman et al. 2017), clip-higher bounds (DAPO, Yu et al. 2025);
    # d/dlr: pg1 -> -A*ratio, pg2 -> -A*ratio inside [lo, hi] (inclusive), 0 outside
    neg_adv = -adv
    pg1 = neg_adv * ratio
    pg2 = neg_adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
    g1 = pg1  # d(-A * ratio)/dlr = -A * ratio
    g2 = tl.where((ratio >= ratio_lo) & (ratio <= ratio_hi), g1, 0.0)
    pg = tl.maximum(pg1, pg2)
    # torch.maximum's gradient: the larger branch, half/half on exact ties
    gpg = tl.where(pg1 > pg2, g1, tl.where(pg2 > pg1, g2, 0.5 * (g1 + g2)))
    clipped = keep & (pg2 > pg1)

    if DUAL_CLIP:
        # dual clip (Ye et al. 2020): where A < 0, pg = min(pg, -A * c); pg3 has no gradient and
        # torch.minimum halves the gradient on ties
        pg3 = neg_adv * dual_clip
        neg = adv < 0.0
        g_dual = tl.where(pg < pg3, gpg, tl.where(pg > pg3, 0.0, 0.5 * gpg))
        gpg = tl.where(neg, g_dual, gpg)
        lower_f = tl.where(keep & neg & (pg > pg3), 1.0, 0.0)
        pg = tl.where(neg, tl.minimum(pg, pg3), pg)
    else:
        lower_f = tl.zeros([BLOCK], tl.float32)

    g_loss = gpg * dlr
    loss_tok = pg
    if HAS_KL:
        # KL estimators: Schulman (2020) "Approximating KL divergence"
        ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        x = lp - ref
        if KL_KIND == 0:  # k1 = logp - ref
            kl = x
            g_kl = tl.full([BLOCK], 1.0, tl.float32)
        elif KL_KIND == 1:  # |logp - ref|; torch's abs gradient is sign(x), 0 at 0
            kl = tl.abs(x)
            g_kl = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
        elif KL_KIND == 2:  # k2 = 0.5 * x^2
            kl = 0.5 * x * x
            g_kl = x
        else:  # k3: d = clamp(ref - logp, +-20), k = clamp(exp(d) - d - 1, +-10)
            d_raw = ref - lp
            d = tl.minimum(tl.maximum(d_raw, -20.0), 20.0)
            e = tl.exp(d)
            k_raw = e - d - 1.0
            kl = tl.minimum(tl.maximum(k_raw, -10.0), 10.0)
            # dk/dlogp = (e^d - 1) * dd/dlogp, dd/dlogp = -1, times both clamp masks
            in_d = (d_raw >= -20.0) & (d_raw <= 20.0)
            in_k = (k_raw >= -10.0) & (k_raw <= 10.0)
            g_kl = tl.where(in_d & in_k, 1.0 - e, 0.0)
        if KL_ST:  # "+" kinds (verl): the value above, the gradient of k2 = 0.5 * x^2
            g_kl = x
        loss_tok = pg + kl_coef * kl
        g_loss = g_loss + kl_coef * g_kl
    else:
        kl = tl.zeros([BLOCK], tl.float32)

    if WRITE_GRAD:
        grad = tl.where(keep, rs * g_loss, 0.0)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inb)

    # per-program partials: [loss, tokens, clipped, clipped_lower, neg_log_ratio, ratio_sum,
    # ratio_max, ratio_min, kl] (same order as STAT_NAMES)
    base = part_ptr + pid.to(tl.int64) * NUM_COLS
    tl.store(base + 0, tl.sum(tl.where(keep, rs * loss_tok, 0.0), axis=0))
    tl.store(base + 1, tl.sum(tl.where(keep, 1.0, 0.0), axis=0))
    tl.store(base + 2, tl.sum(tl.where(clipped, 1.0, 0.0), axis=0))
    tl.store(base + 3, tl.sum(lower_f, axis=0))
    tl.store(base + 4, tl.sum(tl.where(keep, -lr, 0.0), axis=0))
    tl.store(base + 5, tl.sum(tl.where(keep, ratio, 0.0), axis=0))
    tl.store(base + 6, tl.max(tl.where(keep, ratio, float("-inf")), axis=0))
    tl.store(base + 7, tl.min(tl.where(keep, ratio, float("inf")), axis=0))
    tl.store(base + 8, tl.sum(tl.where(keep, kl, 0.0), axis=0))


def _launch(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    row_scale: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float | None,
    seq_log_ratio: torch.Tensor | None, ref_logp: torch.Tensor | None, kl_coef: float, kl_kind: str,
    write_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the kernel; returns (fp32 loss, fp32 [len(STAT_NAMES)] stats, gradient or None)."""
    B, T = logp.shape
    n = B * T
    dev = logp.device
    seq_mode = seq_log_ratio is not None
    has_kl = ref_logp is not None and kl_coef != 0.0
    logp_c = logp.detach().contiguous()
    mask_c = mask.detach().contiguous()
    if mask_c.dtype == torch.bool:
        mask_c = mask_c.view(torch.uint8)  # same bytes, a plain integer pointer for Triton
    # unused pointers get a valid tensor; the constexpr flags guarantee they are never loaded
    old_c = logp_c if seq_mode else old_logp.detach().contiguous()
    seq_c = seq_log_ratio.detach().contiguous() if seq_mode else row_scale
    ref_c = ref_logp.detach().contiguous() if has_kl else logp_c
    num_blocks = max(1, triton.cdiv(n, BLOCK))
    grad = _alloc((B, T), logp.dtype, dev) if write_grad else None
    partials = _alloc((num_blocks, _NUM_COLS), torch.float32, dev)
    _policy_loss_kernel[_grid(num_blocks)](
        logp_c, old_c, advantages.detach().contiguous(), mask_c, row_scale.detach().contiguous(),
        seq_c, ref_c, grad if write_grad else logp_c, partials,
        n, max(T, 1),
        float(1.0 - clip_low), float(1.0 + clip_high), float(dual_clip or 0.0), float(kl_coef),
        SEQ_MODE=seq_mode, DUAL_CLIP=dual_clip is not None, HAS_KL=has_kl, KL_KIND=_KL_FORMULAS[kl_kind][0],
        KL_ST=_KL_FORMULAS[kl_kind][1],
        WRITE_GRAD=write_grad, NUM_COLS=_NUM_COLS, BLOCK=BLOCK,
    )
    return (*_reduce_partials(partials), grad)


def _reduce_partials(partials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, K] partials -> (loss, stats [K - 1]) in fp32, summed in float64 in a fixed
    order (deterministic), max / min for the ratio extremes. Up to ``REDUCE_IN_KERNEL_MAX_BLOCKS``
    blocks one small Triton program does it in one launch (the ~6 torch ops it replaces cost more
    than the main kernel at small sizes); beyond, torch's reductions (negligible there)."""
    if partials.shape[0] <= REDUCE_IN_KERNEL_MAX_BLOCKS:
        out = _alloc((_NUM_COLS,), torch.float32, partials.device)
        _reduce_partials_kernel[(1,)](partials, out, partials.shape[0], NUM_COLS=_NUM_COLS,
                                      COLS_P2=triton.next_power_of_2(_NUM_COLS), COL_MAX=_COL_MAX,
                                      COL_MIN=_COL_MIN, BLOCK_R=REDUCE_BLOCK_ROWS)
        return out[0], out[1:]
    sums = partials.to(torch.float64).sum(dim=0)
    sums[_COL_MAX] = partials[:, _COL_MAX].max()
    sums[_COL_MIN] = partials[:, _COL_MIN].min()
    sums = sums.float()
    return sums[0], sums[1:]


@triton.jit
def _reduce_partials_kernel(part_ptr, out_ptr, num_rows, NUM_COLS: tl.constexpr, COLS_P2: tl.constexpr,
                            COL_MAX: tl.constexpr, COL_MIN: tl.constexpr, BLOCK_R: tl.constexpr):
    cols = tl.arange(0, COLS_P2)
    col_ok = cols < NUM_COLS
    acc = tl.zeros([COLS_P2], tl.float64)
    hi = tl.full([COLS_P2], float("-inf"), tl.float32)
    lo = tl.full([COLS_P2], float("inf"), tl.float32)
    for r0 in range(0, num_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < num_rows)[:, None] & col_ok[None, :]
        x = tl.load(part_ptr + rows.to(tl.int64)[:, None] * NUM_COLS + cols[None, :], mask=ok, other=0.0)
        acc += tl.sum(x.to(tl.float64), axis=0)
        hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), axis=0))
    out = tl.where(cols == COL_MAX, hi, tl.where(cols == COL_MIN, lo, acc.to(tl.float32)))
    tl.store(out_ptr + cols, out, mask=col_ok)


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, row_scale, seq_log_ratio, ref_logp,
                clip_low, clip_high, dual_clip, kl_coef, kl_kind, write_grad):
        loss, stats, grad = _launch(logp, old_logp, advantages, mask, row_scale, clip_low, clip_high,
                                    dual_clip, seq_log_ratio, ref_logp, kl_coef, kl_kind, write_grad)
        ctx.save_for_backward(grad if write_grad else None)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        (grad,) = ctx.saved_tensors
        g = None if grad is None else grad * grad_loss.to(grad.dtype)
        return (g,) + (None,) * 12


def fused_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    row_scale: torch.Tensor, *, clip_low: float, clip_high: float, dual_clip: float | None = None,
    seq_log_ratio: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0, kl_kind: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused token-level policy loss; only ``logp`` receives a gradient.

    Args:
        logp, old_logp, advantages: ``[B, T]`` float (any float dtype, computed in fp32).
        mask: ``[B, T]`` bool or float 0/1; non-zero = token counts.
        row_scale: ``[B]`` float, the weight of each token of row b (encodes the aggregation mode).
        clip_low, clip_high: ratio clamp ``[1 - clip_low, 1 + clip_high]``; ``float('inf')`` = no clip.
        dual_clip: > 1 enables dual clip for negative advantages; None disables it.
        seq_log_ratio: ``[B]`` detached GSPO sequence log-ratio (see :func:`sequence_log_ratio`);
            None = token-level ratios.
        ref_logp, kl_coef, kl_kind: KL-to-reference penalty ``kl_coef * kl`` added per token when
            ``ref_logp`` is given and ``kl_coef != 0`` (otherwise ``ref_logp`` is not read); kinds
            ``k1``, ``abs``, ``k2``, ``k3`` and ``k1+``, ``abs+``, ``k3+`` (that value, the
            gradient of k2: verl's straight-through estimators).

    Returns:
        ``(loss, stats)``: the 0-dim loss ``sum mask * row_scale[b] * L`` (fp32 here, logp's dtype in
        the reference) and a dict of 0-dim fp32 local sums over masked-in tokens: ``tokens``,
        ``clipped``, ``clipped_lower``, ``neg_log_ratio`` (sum of -lr), ``ratio_sum``, ``ratio_max``,
        ``ratio_min`` (``-inf`` / ``+inf`` when no token is masked in), ``kl`` (0 without KL).

    The ``[B, T]`` gradient is computed in the forward (only when grad mode is on and ``logp``
    requires grad) and kept, in logp's dtype, until backward. With fp16 ``logp`` that gradient can
    over/underflow (``row_scale * |A| * e^20`` exceeds 65504); use fp32 or bf16 log-probs.
    """
    _check_args(logp, old_logp, advantages, mask, row_scale, clip_low, clip_high, dual_clip,
                seq_log_ratio, ref_logp, kl_kind)
    if logp.device.type == "cpu" and not _INTERPRETED:
        raise ValueError("fused_policy_loss got CPU tensors but Triton is not in interpreter mode: set "
                         "TRITON_INTERPRET=1 before triton is imported, or use policy_loss_reference")
    loss, stats = _FusedPolicyLoss.apply(logp, old_logp, advantages, mask, row_scale, seq_log_ratio,
                                         ref_logp, float(clip_low), float(clip_high),
                                         None if dual_clip is None else float(dual_clip),
                                         float(kl_coef), kl_kind,
                                         torch.is_grad_enabled() and logp.requires_grad)
    return loss, dict(zip(STAT_NAMES, stats.unbind(0)))


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (Zheng et al. 2025) sequence log-ratio: detached masked mean of ``logp - old_logp`` per row.

    Returns ``[B]`` in fp32 (float64 for float64 input); rows with no masked-in token give 0. This is
    a LOCAL mean: with the sequence split across ranks (context parallel) the caller must all-reduce
    the numerator and the token count itself.
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp, mask must share a [B, T] shape, got "
                         f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(mask.shape)}")
    dtype = torch.promote_types(logp.dtype, torch.float32)
    with torch.no_grad():
        keep = mask != 0
        diff = torch.where(keep, logp.to(dtype) - old_logp.to(dtype), 0.0)
        count = keep.sum(dim=-1).to(dtype)
        return diff.sum(dim=-1) / count.clamp(min=1.0)
