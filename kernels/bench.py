"""Kernel benchmarks: each kernel against torch eager and ``torch.compile`` of its reference.

Honest by construction:

* times come from ``triton.testing.do_bench`` (median of many runs after warm-up, L2 flushed
  between runs), reported in microseconds, with the speed-up over eager torch and over
  ``torch.compile`` of the same reference;
* rates are quoted against what *this* device measurably does, not a datasheet: a device-to-device
  copy (bytes/s) and a large bf16 matmul (FLOP/s) are timed first;
* bandwidth is quoted only where HBM time dominates (the fused loss at 64M+ tokens; below that a
  call moves too few bytes and launch overhead is the figure), with the bytes each row truly moves:
  the forward reads its inputs and writes no gradient, forward + backward also writes it;
* the linear -> log-prob rows are quoted as % of the measured bf16 matmul rate with the *useful*
  FLOPs (``2 T V H`` forward, ``6 T V H`` forward + backward), so recomputation shows as a lower
  percentage (the general entry point recomputes the logits in its backward: 8 T V H done);
* peak memory of forward + backward at the benchmark shape (T=8192, H=4096, V=151936, bf16) is
  counted on any machine, without computing, from the allocations of the real code on fake
  tensors (``kernels/memtrack.py``), for the fused path and the materialised one; on a GPU
  ``torch.cuda.max_memory_allocated`` confirms it.

Goals (issue 15): fused loss >= 85 % of measured copy bandwidth at large sizes and >= 4x eager;
linear -> log-prob >= 80 % forward and >= 70 % forward + backward of the measured matmul rate, at
<= 1/10 of the memory of fp32 logits. On a CPU ``correctness_pass`` runs the kernels under Triton's
interpreter on small shapes instead of timing them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels import fused_linear_logprob as flp
from kernels import fused_policy_loss as fpl
from kernels.memtrack import peak_bytes

MiB = 2**20
BENCH_SHAPE = dict(tokens=8192, hidden=4096, vocab=151936)
LOSS_TOKENS = (8192, 65536, 1 << 20, 16 << 20, 64 << 20)
BANDWIDTH_FROM_TOKENS = 64 << 20  # HBM time dominates from here on (a call moves ~1 GB)
LOGPROB_TOKENS = (4096, 8192, 16384)


# ------------------------------------------------------------------------------------ memory
@dataclass
class MemoryRow:
    path: str
    peak_mib: float
    note: str = ""


def _fake_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str):
    h = torch.empty(tokens, hidden, dtype=dtype, device=device)
    w = torch.empty(vocab, hidden, dtype=dtype, device=device)
    t = torch.empty(tokens, dtype=torch.int64, device=device)
    return h, w, t


def memory_report(tokens: int = BENCH_SHAPE["tokens"], hidden: int = BENCH_SHAPE["hidden"],
                  vocab: int = BENCH_SHAPE["vocab"], dtype: torch.dtype = torch.bfloat16,
                  chunk_bytes: int = flp.DEFAULT_CHUNK_BYTES) -> tuple[list[MemoryRow], float]:
    """Peak bytes above the baseline (inputs, weight, megatron's fp32 main_grad) of forward +
    backward of each path, counted on fake tensors; and the fp32 logits' size, in MiB.

    The fused path runs on fake CUDA tensors (the GPU code path: Triton engine, cuBLAS GEMMs) by
    calling the passes its autograd functions call, in the order autograd calls them (a CPU-only
    torch cannot run the autograd engine over fake CUDA tensors); the kernels allocate nothing of
    their own. The materialised path runs through autograd on fake CPU tensors (the same ops)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows: list[MemoryRow] = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        h, w, t = _fake_inputs(tokens, hidden, vocab, dtype, "cuda")
        w.main_grad = torch.empty(vocab, hidden, dtype=torch.float32, device="cuda")
        base = (h, w, w.main_grad, t)

        def forward_only():
            return flp.general_forward(flp.chunk_plan(h, w, t, with_entropy=True, chunk_bytes=chunk_bytes))

        def general():
            plan = flp.chunk_plan(h, w, t, with_entropy=True, chunk_bytes=chunk_bytes)
            logp, entropy, lse, ent_rows = flp.general_forward(plan)
            upstream = torch.ones_like(logp)  # d loss / d logp and d loss / d entropy
            return flp.general_backward(plan, lse, ent_rows, upstream, upstream, need_dh=True, need_dw=True,
                                        chunk_bytes=chunk_bytes)

        def single_pass():
            plan = flp.chunk_plan(h, w, t, with_entropy=True, chunk_bytes=chunk_bytes)
            # the loss's values do not matter for memory (a fake tensor has none); its gradient
            # buffers are allocated all the same
            res = flp.loss_forward(plan, lambda lp, en, rows: lp.detach().sum() + en.detach().sum(),
                                   want_dh=True, want_dw=True, chunk_bytes=chunk_bytes)
            return flp.loss_backward(plan, res, 1.0, chunk_bytes)

        for name, fn, note in (
            ("fused, forward only (old/ref log-probs)", forward_only, "no_grad"),
            ("fused general, fwd+bwd", general, "dW into main_grad"),
            ("fused loss (single pass), fwd+bwd", single_pass, "dW into main_grad"),
        ):
            rows.append(MemoryRow(name, peak_bytes(fn, *base) / MiB, note))
    with FakeTensorMode(allow_non_fake_inputs=True):
        h, w, t = _fake_inputs(tokens, hidden, vocab, dtype, "cpu")
        h.requires_grad_(True)
        w.requires_grad_(True)

        def materialised():  # what verl / a plain training loop does: bf16 logits, fp32 softmax
            logits = (h @ w.t()).float()
            log_p = torch.log_softmax(logits, dim=-1)
            logp = log_p.gather(1, t[:, None].clamp(min=0)).squeeze(1)
            entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
            (logp.sum() + entropy.sum()).backward()

        def reference():
            logp, entropy = flp.linear_logprob_reference(h, w, t, with_entropy=True)
            (logp.sum() + entropy.sum()).backward()

        rows.append(MemoryRow("materialised (bf16 logits, fp32 softmax), fwd+bwd", peak_bytes(materialised, h, w, t) / MiB,
                              "weight.grad bf16"))
        rows.append(MemoryRow("linear_logprob_reference, fwd+bwd", peak_bytes(reference, h, w, t) / MiB,
                              "fp32 throughout"))
    return rows, tokens * vocab * 4 / MiB


def memory_table(rows: list[MemoryRow], logits_mib: float, shape: dict) -> str:
    lines = [f"peak memory of forward + backward above inputs/weights, T={shape['tokens']} H={shape['hidden']} "
             f"V={shape['vocab']} bf16 (counted on fake tensors; fp32 logits alone: {logits_mib:.0f} MiB, "
             f"goal <= 1/10 = {logits_mib / 10:.0f} MiB)",
             f"  {'path':<52}{'peak MiB':>10}{'/ fp32 logits':>15}  note"]
    for r in rows:
        lines.append(f"  {r.path:<52}{r.peak_mib:>10.0f}{r.peak_mib / logits_mib:>14.3f}x  {r.note}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    kernel: str
    size: str
    path: str
    us: float
    work: float = 0.0  # bytes or useful FLOPs, 0 when no rate is quoted
    unit: str = ""  # "GB/s", "TFLOP/s" or ""
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        if not self.work:
            return math.nan
        scale = 1e9 if self.unit == "GB/s" else 1e12
        return self.work / (self.us * 1e-6) / scale


def bench_us(fn: Callable[[], object]) -> float:
    """Median microseconds of ``fn`` by ``triton.testing.do_bench`` (warm-up, L2 flush per run)."""
    import triton.testing

    fn()  # compile / autotune outside the timed runs
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_peaks() -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s) this device achieves on large operands."""
    n = 1 << 28  # 1 GiB of fp32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 4 / (us * 1e-6) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us = bench_us(lambda: a @ b)
    return copy_gbs, 2 * 8192**3 / (us * 1e-6) / 1e12


def loss_inputs(tokens: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    b = max(tokens // 1024, 1)
    t = tokens // b
    old = -torch.rand(b, t, generator=g, device=device) * 4
    logp = (old + torch.randn(b, t, generator=g, device=device) * 0.3).to(dtype)
    adv = torch.randn(b, 1, generator=g, device=device).expand(b, t).contiguous()
    mask = torch.rand(b, t, generator=g, device=device) < 0.9
    ref = (old + 0.1 * torch.randn(b, t, generator=g, device=device)).to(dtype)
    scale = torch.full((b,), 1.0 / max(int(mask.sum()), 1), device=device)
    return logp, old.to(dtype), adv, mask, scale, ref


def loss_kwargs(ref):
    return dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, ref_logp=ref, kl_coef=0.01, kl_kind="k3+")


def loss_bytes(logp, old, adv, mask, scale, ref, *, backward: bool) -> int:
    """Bytes the fused loss kernel moves: every input read once (mask as bytes), the per-program
    partials written, and the [B, T] gradient written only when a backward is wanted."""
    from kernels.fused_policy_loss import BLOCK, STAT_NAMES

    read = sum(x.numel() * x.element_size() for x in (logp, old, adv, mask, ref)) + scale.numel() * 4
    partials = math.ceil(logp.numel() / BLOCK) * (1 + len(STAT_NAMES)) * 4
    return read + partials + (logp.numel() * logp.element_size() if backward else 0)


def bench_policy_loss(tokens: int, dtype: torch.dtype, *, with_compile: bool = True) -> list[Timing]:
    logp, old, adv, mask, scale, ref = loss_inputs(tokens, dtype, "cuda")
    kw = loss_kwargs(ref)
    fns = [("triton", fpl.fused_policy_loss), ("eager", fpl.policy_loss_reference)]
    if with_compile:
        fns.append(("compile", torch.compile(fpl.policy_loss_reference, dynamic=False)))
    out: list[Timing] = []
    for name, fn in fns:
        for backward in (False, True):
            x = logp.detach().requires_grad_(backward)

            def step():
                loss, _ = fn(x, old, adv, mask, scale, **kw)
                if backward:
                    loss.backward()

            quote = tokens >= BANDWIDTH_FROM_TOKENS
            work = loss_bytes(logp, old, adv, mask, scale, ref, backward=backward) if quote else 0.0
            out.append(Timing("fused policy loss", f"{tokens} tokens", f"{name} {'fwd+bwd' if backward else 'fwd'}",
                              bench_us(step), work, "GB/s" if quote else ""))
    return out


def bench_linear_logprob(tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                         with_reference: bool, *, with_compile: bool = True) -> list[Timing]:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g, device="cuda") * 0.5).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, device="cuda") * 0.02).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g, device="cuda")
    unit = 2.0 * tokens * vocab * hidden
    size = f"T={tokens} H={hidden} V={vocab}"
    out: list[Timing] = []
    main_grad = torch.zeros(vocab, hidden, dtype=torch.float32, device="cuda")

    def fused_fwd():
        with torch.no_grad():
            flp.fused_linear_logprob(h, w, targets, with_entropy=True)

    hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    ww.main_grad = main_grad

    def fused_general():
        hh.grad = None
        logp, ent = flp.fused_linear_logprob(hh, ww, targets, with_entropy=True)
        (logp.sum() + ent.sum()).backward()

    def fused_single():
        hh.grad = None
        loss, _, _ = flp.fused_linear_logprob_loss(hh, ww, targets, lambda lp, en, rows: lp.sum() + en.sum(),
                                                   with_entropy=True)
        loss.backward()

    rows = [("fused fwd", fused_fwd, unit), ("fused general fwd+bwd", fused_general, 3 * unit),
            ("fused single-pass fwd+bwd", fused_single, 3 * unit)]
    if with_reference:
        refs = [("eager", flp.linear_logprob_reference)]
        if with_compile:
            refs.append(("compile", torch.compile(flp.linear_logprob_reference, dynamic=False)))
        for name, ref_fn in refs:
            rh, rw = h.detach().requires_grad_(True), w.detach().requires_grad_(True)

            def ref_fwd(ref_fn=ref_fn):
                with torch.no_grad():
                    ref_fn(h, w, targets, with_entropy=True)

            def ref_both(ref_fn=ref_fn, rh=rh, rw=rw):
                rh.grad = rw.grad = None
                logp, ent = ref_fn(rh, rw, targets, with_entropy=True)
                (logp.sum() + ent.sum()).backward()

            rows += [(f"{name} fwd", ref_fwd, unit), (f"{name} fwd+bwd", ref_both, 3 * unit)]
    for name, fn, flops in rows:
        try:
            fn()  # compile / autotune first, then one call for the peak, then the timed runs
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / MiB
            us = bench_us(fn)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            out.append(Timing("linear->logprob", size, name, math.nan, extra={"note": "out of memory"}))
            continue
        out.append(Timing("linear->logprob", size, name, us, flops, "TFLOP/s", {"peak_mib": peak}))
    return out


def timing_table(rows: list[Timing], peak_rate: float, peak_unit: str) -> str:
    """One block per (kernel, size): us, speed-up vs eager and vs compile of the same direction,
    and the rate as % of the measured peak where one is quoted."""
    lines = []
    for key in dict.fromkeys((r.kernel, r.size) for r in rows):
        block = [r for r in rows if (r.kernel, r.size) == key]
        lines.append(f"{key[0]}, {key[1]}")
        lines.append(f"  {'path':<28}{'us':>11}{'vs eager':>10}{'vs compile':>12}{'rate':>12}{'% peak':>8}")
        for r in block:
            direction = "fwd+bwd" if "fwd+bwd" in r.path else "fwd"
            eager = next((x.us for x in block if x.path == f"eager {direction}"), math.nan)
            comp = next((x.us for x in block if x.path == f"compile {direction}"), math.nan)
            rate = f"{r.rate:>8.1f} {r.unit.split('/')[0]:<3}" if r.work else f"{'-':>12}"
            pct = f"{100 * r.rate / peak_rate:>7.1f}%" if r.work else f"{'-':>8}"
            note = f"  {r.extra['note']}" if "note" in r.extra else ""
            lines.append(f"  {r.path:<28}{r.us:>11.1f}{eager / r.us:>9.2f}x{comp / r.us:>11.2f}x{rate}{pct}{note}")
    lines.append(f"  (% peak: of the measured {peak_unit}; linear->logprob rates count useful FLOPs, 2TVH fwd, 6TVH fwd+bwd)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ correctness
def correctness_pass() -> list[tuple[str, float, float]]:
    """Small-shape kernel-vs-float64 errors (on CPU under TRITON_INTERPRET=1, or on CUDA):
    (check, max abs error, tolerance). The float64 side is written here from the definitions."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    logp, old, adv, mask, scale, ref = loss_inputs(3000, torch.float32, device, seed=1)
    x = logp.detach().requires_grad_(True)
    loss, _ = fpl.fused_policy_loss(x, old, adv, mask, scale, **loss_kwargs(ref))
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logp.double().detach().requires_grad_(True)
    a64, old64, ref64 = adv.double(), old.double(), ref.double()
    ratio = (x64 - old64).clamp(-20, 20).exp()
    tok = torch.maximum(-a64 * ratio, -a64 * ratio.clamp(0.8, 1.28))
    tok = torch.where(a64 < 0, torch.minimum(tok, -a64 * 3.0), tok)
    diff = x64 - ref64
    log_r = (ref64 - x64).clamp(-20, 20)
    k3 = (log_r.exp() - log_r - 1).clamp(-10, 10)
    kl = 0.5 * diff ** 2 + (k3 - 0.5 * diff ** 2).detach()  # k3+: k3's value, k2's gradient
    loss64 = torch.where(mask, scale.double()[:, None] * (tok + 0.01 * kl), 0.0).sum()
    (grad64,) = torch.autograd.grad(loss64, x64)
    results.append(("fused policy loss: loss", abs(float(loss.detach()) - float(loss64.detach())),
                    1e-5 * max(abs(float(loss64.detach())), 1e-3)))
    results.append(("fused policy loss: d loss / d logp", float((grad.double() - grad64).abs().max()),
                    1e-5 * float(grad64.abs().max())))
    g = torch.Generator(device=device).manual_seed(2)
    h = torch.randn(70, 64, generator=g, device=device)
    w = torch.randn(333, 64, generator=g, device=device) * 0.3
    t = torch.randint(0, 333, (70,), generator=g, device=device)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = flp.fused_linear_logprob(hh, ww, t, with_entropy=True, chunk_bytes=16 * 333 * 4, engine="triton")
    gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), (hh, ww))
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    log_p = torch.log_softmax(h64 @ w64.T, dim=-1)
    lp64, ent64 = log_p.gather(1, t[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)
    gh64, gw64 = torch.autograd.grad(lp64.sum() + ent64.sum(), (h64, w64))
    for name, got, exp in (("linear->logprob: logp", lp, lp64), ("linear->logprob: entropy", ent, ent64),
                           ("linear->logprob: d/d hidden", gh, gh64), ("linear->logprob: d/d weight", gw, gw64)):
        results.append((name, float((got.double() - exp).abs().max()), 1e-5 * max(float(exp.abs().max()), 1.0)))
    return results
