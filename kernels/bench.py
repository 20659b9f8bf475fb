"""Kernel benchmarks: each fused kernel against torch eager and ``torch.compile`` of its reference.

Figures are reported against what *this* device measurably does, not against a datasheet: the
run first measures a device-to-device copy (the memory-bandwidth ceiling for the elementwise
loss kernel) and a large bf16 matmul (the compute ceiling for the linear -> log-prob kernel), then
prints each kernel's achieved GB/s or TFLOP/s as a percentage of those, and its peak memory against
the materialised path.

Byte and FLOP counts are the *useful* work, so recomputation shows up as a lower percentage:
* fused loss: bytes of the inputs read once plus the gradient written once;
* linear -> log-prob: ``2 T V H`` FLOPs forward, ``6 T V H`` forward + backward (a forward and
  the two gradient matmuls), whatever the kernel recomputes.

Goals on an H100 (issue 3): fused loss >= 85 % of copy bandwidth and >= 4x eager; linear ->
log-prob >= 60 % of the matmul rate forward (aim 80 %) at <= 1/10 of the memory of materialised
logits. This module needs CUDA for timings; on a CPU ``correctness_pass`` runs the kernels under
Triton's interpreter on small shapes instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import fused_linear_logprob as flp
from kernels import fused_policy_loss as fpl


@dataclass
class Timing:
    name: str
    ms: float
    peak_mib: float
    work: float  # bytes or FLOPs
    unit: str  # "GB/s" or "TFLOP/s"

    @property
    def rate(self) -> float:
        scale = 1e9 if self.unit == "GB/s" else 1e12
        return self.work / (self.ms * 1e-3) / scale


def time_cuda(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10) -> tuple[float, float]:
    """Median milliseconds of ``fn`` and its peak memory above the baseline, in MiB."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def measure_peaks() -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s) this device achieves on large operands."""
    n = 1 << 28  # 1 GiB of fp32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = time_cuda(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms, _ = time_cuda(lambda: a @ b)
    return copy_gbs, 2 * 8192**3 / (ms * 1e-3) / 1e12


def _loss_inputs(tokens: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    b = max(tokens // 1024, 1)
    t = tokens // b
    old = -torch.rand(b, t, generator=g, device=device) * 4
    logp = (old + torch.randn(b, t, generator=g, device=device) * 0.3).to(dtype)
    adv = torch.randn(b, 1, generator=g, device=device).expand(b, t).contiguous()
    mask = torch.rand(b, t, generator=g, device=device) < 0.9
    ref = (old + 0.1).to(dtype)
    scale = torch.full((b,), 1.0 / max(int(mask.sum()), 1), device=device)
    return logp, old.to(dtype), adv, mask, scale, ref


def _loss_kwargs(ref):
    return dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, ref_logp=ref, kl_coef=0.01, kl_kind="k3")


def bench_policy_loss(tokens: int, dtype: torch.dtype, copy_gbs: float) -> list[Timing]:
    logp, old, adv, mask, scale, ref = _loss_inputs(tokens, dtype, "cuda")
    el = logp.element_size()
    # read logp, old, ref (dtype), advantages (fp32), mask (bool); write the gradient (dtype)
    bytes_fwd = logp.numel() * (3 * el + 4 + 1 + el)
    out: list[Timing] = []
    compiled = torch.compile(fpl.policy_loss_reference)
    for name, fn in (("triton", fpl.fused_policy_loss), ("eager", fpl.policy_loss_reference),
                     ("compile", compiled)):
        for backward in (False, True):
            x = logp.detach().requires_grad_(backward)

            def step():
                loss, _ = fn(x, old, adv, mask, scale, **_loss_kwargs(ref))
                if backward:
                    loss.backward()

            ms, peak = time_cuda(step)
            out.append(Timing(f"{name} {'fwd+bwd' if backward else 'fwd'}", ms, peak,
                              bytes_fwd + (2 * logp.numel() * el if backward else 0), "GB/s"))
    return out


def bench_linear_logprob(tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                         with_reference: bool) -> list[Timing]:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g, device="cuda") * 0.5).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, device="cuda") * 0.02).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g, device="cuda")
    flops = 2.0 * tokens * vocab * hidden
    fns = [("triton", flp.fused_linear_logprob)]
    if with_reference:
        fns += [("eager", flp.linear_logprob_reference), ("compile", torch.compile(flp.linear_logprob_reference))]
    out: list[Timing] = []
    for name, fn in fns:
        for backward in (False, True):
            hh, ww = h.detach().requires_grad_(backward), w.detach().requires_grad_(backward)

            def step():
                logp, ent = fn(hh, ww, targets, with_entropy=True)
                if backward:
                    (logp.sum() + ent.sum()).backward()

            try:
                ms, peak = time_cuda(step, warmup=2, iters=5)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"  {name}: out of memory at T={tokens}")
                continue
            out.append(Timing(f"{name} {'fwd+bwd' if backward else 'fwd'}", ms, peak,
                              flops * (3 if backward else 1), "TFLOP/s"))
    return out


def report(title: str, rows: list[Timing], peak_rate: float, materialised_mib: float | None = None) -> str:
    lines = [title, f"  {'path':<16}{'ms':>10}{'rate':>12}{'% peak':>9}{'vs eager':>10}{'peak MiB':>11}"]
    eager = {r.name.split()[1]: r.ms for r in rows if r.name.startswith("eager")}
    for r in rows:
        speedup = eager.get(r.name.split()[1])
        lines.append(
            f"  {r.name:<16}{r.ms:>10.3f}{r.rate:>9.1f} {r.unit.split('/')[0]:<3}{100 * r.rate / peak_rate:>8.1f}%"
            f"{(speedup / r.ms if speedup else float('nan')):>9.2f}x{r.peak_mib:>11.0f}"
        )
    if materialised_mib is not None:
        lines.append(f"  materialised fp32 logits alone: {materialised_mib:.0f} MiB")
    return "\n".join(lines)


def correctness_pass() -> list[tuple[str, float, float]]:
    """Small-shape kernel-vs-float64 errors (runs on CPU under TRITON_INTERPRET=1 or on CUDA):
    (check, max abs error, tolerance)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    logp, old, adv, mask, scale, ref = _loss_inputs(3000, torch.float32, device, seed=1)
    x = logp.detach().requires_grad_(True)
    loss, _ = fpl.fused_policy_loss(x, old, adv, mask, scale, **_loss_kwargs(ref))
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logp.double().detach().requires_grad_(True)
    loss64, _ = fpl.policy_loss_reference(x64, old.double(), adv.double(), mask, scale.double(),
                                          **_loss_kwargs(ref.double()))
    (grad64,) = torch.autograd.grad(loss64, x64)
    results.append(("fused policy loss: loss", abs(float(loss.detach()) - float(loss64.detach())), 1e-5 * max(abs(float(loss64)), 1e-3)))
    results.append(("fused policy loss: d loss / d logp", float((grad.double() - grad64).abs().max()),
                    1e-5 * float(grad64.abs().max())))
    g = torch.Generator(device=device).manual_seed(2)
    h = torch.randn(70, 64, generator=g, device=device)
    w = torch.randn(333, 64, generator=g, device=device) * 0.3
    t = torch.randint(0, 333, (70,), generator=g, device=device)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = flp.fused_linear_logprob(hh, ww, t, with_entropy=True)
    gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), (hh, ww))
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    lp64, ent64 = flp.linear_logprob_reference(h64, w64, t, with_entropy=True)
    gh64, gw64 = torch.autograd.grad(lp64.sum() + ent64.sum(), (h64, w64))
    for name, got, exp in (("linear->logprob: logp", lp, lp64), ("linear->logprob: entropy", ent, ent64),
                           ("linear->logprob: d/d hidden", gh, gh64), ("linear->logprob: d/d weight", gw, gw64)):
        results.append((name, float((got.double() - exp).abs().max()), 1e-5 * max(float(exp.abs().max()), 1.0)))
    return results
