"""Chunked linear -> log-prob (both entry points, both engines) against a float64 oracle written here.

The oracle (``oracle``) is log_softmax of the materialised float64 logits, gathered at the targets,
and the entropy ``-sum p log p``; gradients by float64 autograd. It imports nothing from the module
under test.

Tolerances (stated once, used throughout):
  * fp32 vs float64: rtol 1e-5, atol 1e-5 on logp, entropy and both gradients (observed ~1e-6).
  * extreme logits (|z| up to ~80): logp/entropy atol 1e-4, rtol 1e-5 (an fp32 logit of magnitude
    80 carries ~5e-6 rounding); gradients max |err| <= 2e-5 * max |ref|.
  * bf16: the logits are bf16, as the matmul returns them, so the oracle rounds its float64 logits
    to bf16 too (with a straight-through gradient). A logit whose fp32 accumulation lands on the
    other side of a rounding boundary differs by one bf16 ulp, so logp/entropy get
    atol = ulp_bf16(max |z|) (observed 5e-7 on CPU, where the roundings agree); gradients
    max |err| <= 2e-2 * max |ref| (dz is rounded to bf16 before the backward matmuls).
On CPU the Triton engine runs under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
with a 16-wide vocab tile and small chunk budgets, so every row spans several tiles with a ragged
last one and every call several chunks with a ragged last one.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kernels.fused_linear_logprob as flp
from kernels.memtrack import peak_bytes

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "tp_worker.py"
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
EXTREME_TOL = dict(rtol=1e-5, atol=1e-4)
EXTREME_GRAD_TOL = 2e-5  # relative to max |grad|
ENGINES = ["torch", "triton"]
ENTRIES = ["general", "loss"]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(flp, "INTERPRET_BLOCK_V", 16)


def oracle(hidden, weight, targets, *, vocab_limit=None, round_bf16=False):
    """float64 logp and entropy of softmax(hidden @ weight.T) over the first vocab_limit columns;
    0 where the target is -100. Differentiable in hidden and weight."""
    z = hidden @ weight.T
    if round_bf16:
        z = z + (z.detach().to(torch.bfloat16).double() - z.detach())
    if vocab_limit is not None:
        z = z[:, :vocab_limit]
    log_p = torch.log_softmax(z, dim=-1)
    keep = targets != -100
    logp = torch.where(keep, log_p.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1), 0.0)
    entropy = torch.where(keep, -(log_p.exp() * log_p).sum(-1), 0.0)
    return logp, entropy


def make_inputs(T, H, V, *, seed=0, scale=1.0, n_ignored=0, device="cpu", vocab_limit=None):
    """float64 master copies; logits ~N(0, scale^2); a and b weigh logp and entropy in the loss."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    targets = torch.randint(0, vocab_limit or V, (T,), generator=g)
    if n_ignored:
        targets[torch.randperm(T, generator=g)[:n_ignored]] = -100
    a = torch.randn(T, generator=g, dtype=torch.float64)
    b = torch.randn(T, generator=g, dtype=torch.float64)
    return [x.to(device) for x in (hidden, weight, targets, a, b)]


def run(entry, hidden, weight, targets, a, b, *, with_entropy=True, **kw):
    """Forward and backward of L = sum(a * logp + b * entropy) through one entry point; returns
    (logp, entropy, grad_hidden, grad_weight), detached."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    a_, b_ = a.float(), b.float()
    if entry == "loss":
        def token_loss(logp, entropy, rows):
            loss = (logp * a_[rows]).sum()
            return loss + (entropy * b_[rows]).sum() if entropy is not None else loss

        loss, logp, entropy = flp.fused_linear_logprob_loss(hidden, weight, targets, token_loss,
                                                           with_entropy=with_entropy, **kw)
    else:
        out = flp.fused_linear_logprob(hidden, weight, targets, with_entropy=with_entropy, **kw)
        logp, entropy = out if with_entropy else (out, None)
        loss = (logp * a_).sum() + ((entropy * b_).sum() if with_entropy else 0.0)
    loss.backward()
    return logp.detach(), None if entropy is None else entropy.detach(), hidden.grad, weight.grad


def expected(hidden, weight, targets, a, b, *, with_entropy=True, vocab_limit=None, round_bf16=False):
    h = hidden.double().detach().requires_grad_()
    w = weight.double().detach().requires_grad_()
    logp, entropy = oracle(h, w, targets, vocab_limit=vocab_limit, round_bf16=round_bf16)
    loss = (logp * a).sum() + ((entropy * b).sum() if with_entropy else 0.0)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return logp.detach(), entropy.detach(), gh, gw


def assert_grad_close(g, r, tol, grad_tol, what):
    """Elementwise rtol/atol, or (grad_tol given) max |err| <= grad_tol * max |ref|."""
    assert g is not None and g.shape == r.shape, what
    if grad_tol is None:
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda m: f"{what}: {m}")
    else:
        err, scale = (g.double() - r).abs().max().item(), r.abs().max().item()
        assert err <= grad_tol * scale, f"{what}: max err {err:.3g} > {grad_tol} * max |ref| {scale:.3g}"


def check(entry, engine, hidden, weight, targets, a, b, *, with_entropy=True, dtype=torch.float32, tol=FP32_TOL,
          grad_tol=None, vocab_limit=None, chunk_rows=7):
    """One entry point on `dtype` inputs vs the float64 oracle on the same (rounded) inputs."""
    h, w = hidden.to(dtype), weight.to(dtype)
    per_row = flp._row_bytes(engine, w.shape[0], dtype)
    got = run(entry, h, w, targets, a, b, with_entropy=with_entropy, engine=engine, vocab_limit=vocab_limit,
              chunk_bytes=chunk_rows * per_row)
    ref = expected(h, w, targets, a, b, with_entropy=with_entropy, vocab_limit=vocab_limit,
                   round_bf16=dtype == torch.bfloat16)
    assert got[0].dtype == torch.float32 and got[0].shape == targets.shape
    torch.testing.assert_close(got[0].double(), ref[0], **tol, msg=lambda m: f"logp: {m}")
    if with_entropy:
        assert got[1].dtype == torch.float32
        torch.testing.assert_close(got[1].double(), ref[1], **tol, msg=lambda m: f"entropy: {m}")
    for name, g, r, x in (("grad_hidden", got[2], ref[2], h), ("grad_weight", got[3], ref[3], w)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_grad_close(g, r, tol, grad_tol, name)
    ignored = targets == -100
    assert torch.all(got[0][ignored] == 0) and torch.all(got[2][ignored] == 0)
    if with_entropy:
        assert torch.all(got[1][ignored] == 0)
    return got, ref


# --- fp32 against float64 ---------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("shape", [(37, 48, 203), (1, 48, 203), (20, 7, 17)], ids=["odd", "T1", "tiny"])
def test_fp32_matches_float64(shape, with_entropy, engine, entry):
    T, H, V = shape
    check(entry, engine, *make_inputs(T, H, V, n_ignored=min(3, T - 1), seed=T), with_entropy=with_entropy)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("engine", ENGINES)
def test_vocab_padding_is_left_out(engine, entry):
    """vocab_limit=150 of 203 rows: the 53 padding rows (set huge, so they would dominate any
    softmax that counted them) change nothing, and get no gradient."""
    hidden, weight, targets, a, b = make_inputs(29, 16, 203, seed=4, n_ignored=2, vocab_limit=150)
    weight[150:] = 50.0
    got, _ = check(entry, engine, hidden, weight, targets, a, b, vocab_limit=150)
    assert torch.all(got[3][150:] == 0)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("engine", ENGINES)
def test_chunk_size_does_not_change_the_result(engine, entry):
    """One chunk per row, a ragged split, one chunk for all: the same values to fp32 rounding."""
    inputs = make_inputs(23, 16, 40, seed=6, n_ignored=4)
    results = [check(entry, engine, *inputs, chunk_rows=c)[0] for c in (1, 5, 100)]
    for other in results[1:]:
        for x, y in zip(results[0], other):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_all_rows_ignored_and_empty_batch(engine):
    hidden, weight, targets, a, b = make_inputs(5, 16, 40)
    targets[:] = -100
    for entry in ENTRIES:
        got, _ = check(entry, engine, hidden, weight, targets, a, b)
        assert torch.all(got[3] == 0)
        empty = make_inputs(0, 16, 40)
        logp, entropy, g_h, g_w = run(entry, empty[0].float(), empty[1].float(), *empty[2:], engine=engine)
        assert logp.shape == entropy.shape == (0,) and g_h.shape == (0, 16) and torch.all(g_w == 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_extreme_logits_finite_and_correct(engine):
    # hidden scaled so the logits reach about +-80: a naive exp() would overflow fp32 (> 88.7)
    hidden, weight, targets, a, b = make_inputs(37, 48, 203, seed=3)
    z = hidden @ weight.T
    hidden = hidden * (80.0 / z.abs().max())
    z = hidden @ weight.T
    targets[0], targets[1] = z[0].argmax(), z[1].argmin()  # logp near 0 and near -160
    for entry in ENTRIES:
        got, ref = check(entry, engine, hidden, weight, targets, a, b, tol=EXTREME_TOL, grad_tol=EXTREME_GRAD_TOL)
        assert all(torch.isfinite(x).all() for x in got)
        assert ref[0][1] < -100  # the comparison did cover a hugely negative logp


@pytest.mark.parametrize("n_ignored", [0, 2])
@pytest.mark.parametrize("engine", ENGINES)
def test_non_contiguous_inputs(engine, n_ignored):
    hidden, weight, targets, a, b = make_inputs(21, 40, 75, n_ignored=n_ignored)
    h_nc = hidden.float().T.contiguous().T  # column-major
    w_nc = torch.stack([weight.float(), weight.float()], dim=2)[..., 0]  # stride 2
    t_nc = torch.stack([targets, targets], dim=1)[:, 0]
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or t_nc.is_contiguous())
    for entry in ENTRIES:
        got = run(entry, h_nc, w_nc, t_nc, a, b, engine=engine, chunk_bytes=6 * flp._row_bytes(engine, 75, torch.float32))
        for g, r in zip(got, expected(hidden, weight, targets, a, b)):
            torch.testing.assert_close(g.double(), r, **FP32_TOL)


def test_only_one_input_requires_grad():
    hidden, weight, targets, a, _ = make_inputs(10, 16, 33)
    ref = expected(hidden, weight, targets, a, torch.zeros_like(a))
    w = weight.float().requires_grad_()
    flp.fused_linear_logprob(hidden.float(), w, targets).mul(a.float()).sum().backward()
    torch.testing.assert_close(w.grad.double(), ref[3], **FP32_TOL)
    h = hidden.float().requires_grad_()
    loss, _, _ = flp.fused_linear_logprob_loss(h, weight.float(), targets,
                                               lambda lp, en, rows: (lp * a.float()[rows]).sum())
    loss.backward()
    torch.testing.assert_close(h.grad.double(), ref[2], **FP32_TOL)


@pytest.mark.parametrize("engine", ENGINES)
def test_entropy_for_a_metric_only(engine):
    """Entropy computed (a metric) but not in the loss: no gradient comes back for it, and the
    gradients are those of the log-prob term alone."""
    hidden, weight, targets, a, _ = make_inputs(17, 16, 50, seed=14, n_ignored=2)
    ref = expected(hidden, weight, targets, a, torch.zeros_like(a))
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp, entropy = flp.fused_linear_logprob(h, w, targets, with_entropy=True, engine=engine,
                                             chunk_bytes=4 * flp._row_bytes(engine, 50, torch.float32))
    (logp * a.float()).sum().backward()
    torch.testing.assert_close(entropy.double(), ref[1], **FP32_TOL)
    torch.testing.assert_close(h.grad.double(), ref[2], **FP32_TOL)
    torch.testing.assert_close(w.grad.double(), ref[3], **FP32_TOL)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_matches_float64_on_bf16_logits(engine, entry):
    hidden, weight, targets, a, b = make_inputs(37, 48, 203, n_ignored=3, seed=5, scale=2.0)
    z_max = float((hidden.bfloat16().double() @ weight.bfloat16().double().T).abs().max())
    ulp = 2.0 ** (math.floor(math.log2(z_max)) - 7)
    check(entry, engine, hidden, weight, targets, a, b, dtype=torch.bfloat16, tol=dict(rtol=0.0, atol=ulp),
          grad_tol=2e-2)


# --- the loss entry: a nonlinear token loss, its scaling, main_grad ---------------------------


def _ppo_token_loss(old, adv, n_tokens):
    """A PPO-clip token loss over a chunk (nonlinear in logp) plus an entropy bonus, token-mean."""
    def token_loss(logp, entropy, rows):
        ratio = torch.exp(logp - old[rows])
        per_token = torch.maximum(-adv[rows] * ratio, -adv[rows] * ratio.clamp(0.8, 1.28))
        return (per_token.sum() - 0.01 * entropy.sum()) / n_tokens
    return token_loss


@pytest.mark.parametrize("engine", ENGINES)
def test_loss_entry_with_a_nonlinear_token_loss(engine):
    hidden, weight, targets, _, _ = make_inputs(31, 24, 90, seed=9, n_ignored=5)
    g = torch.Generator().manual_seed(1)
    keep = targets != -100
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp64, ent64 = oracle(h64, w64, targets)
    old = (logp64.detach() + 0.3 * torch.randn(31, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(31, generator=g, dtype=torch.float64).float()
    n = int(keep.sum())
    ratio = torch.exp(logp64 - old.double())
    tok = torch.maximum(-adv.double() * ratio, -adv.double() * ratio.clamp(0.8, 1.28))
    want = (torch.where(keep, tok, 0.0).sum() - 0.01 * torch.where(keep, ent64, 0.0).sum()) / n
    want_h, want_w = torch.autograd.grad(want, (h64, w64))
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss, logp, entropy = flp.fused_linear_logprob_loss(h, w, targets, _ppo_token_loss(old, adv, n), with_entropy=True,
                                                        engine=engine, chunk_bytes=4 * flp._row_bytes(engine, 90, torch.float32))
    assert not logp.requires_grad and not entropy.requires_grad
    (3.0 * loss).backward()  # an incoming gradient other than 1 rescales both gradients
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp.double(), logp64.detach(), **FP32_TOL)
    torch.testing.assert_close(h.grad.double(), 3.0 * want_h, **FP32_TOL)
    torch.testing.assert_close(w.grad.double(), 3.0 * want_w, **FP32_TOL)


@pytest.mark.parametrize("incoming", [1.0, 2.5])
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("engine", ENGINES)
def test_weight_gradient_accumulates_into_main_grad(engine, entry, incoming):
    """megatron's DDP gives the weight an fp32 main_grad: dW is added there (on top of what it
    held), autograd gets None for the weight; with the loss entry an incoming gradient other than
    1 takes the correction pass."""
    hidden, weight, targets, a, b = make_inputs(19, 16, 45, seed=12, n_ignored=2)
    ref = expected(hidden, weight, targets, a, b)
    for dtype in (torch.float32, torch.bfloat16):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        start = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
        w.main_grad = start.clone()
        kw = dict(engine=engine, with_entropy=True, chunk_bytes=5 * flp._row_bytes(engine, 45, dtype))
        if entry == "loss":
            loss, _, _ = flp.fused_linear_logprob_loss(
                h, w, targets, lambda lp, en, rows: (lp * a.float()[rows] + en * b.float()[rows]).sum(), **kw)
        else:
            logp, entropy = flp.fused_linear_logprob(h, w, targets, **kw)
            loss = (logp * a.float() + entropy * b.float()).sum()
        (incoming * loss).backward()
        assert w.grad is None and w.main_grad.dtype == torch.float32
        dw = w.main_grad - start
        if dtype == torch.float32:
            torch.testing.assert_close(dw.double(), incoming * ref[3], **FP32_TOL)
        else:
            ref16 = expected(hidden.to(dtype), weight.to(dtype), targets, a, b, round_bf16=True)
            assert_grad_close(dw, incoming * ref16[3], None, 2e-2, "main_grad (bf16)")
        assert flp.LAST_WGRAD_PATH == ("fp32" if dtype == torch.float32 else "cpu_upcast")


def test_flops_are_6TVH_for_the_loss_entry_and_8TVH_otherwise():
    """Matmul FLOPs as torch's FlopCounterMode counts them (the row kernels are not matmuls):
    forward only 2 N V H, general forward + backward 8 N V H, loss entry 6 N V H, N the rows
    with a real target."""
    T, H, V = 40, 16, 64
    hidden, weight, targets, a, b = make_inputs(T, H, V, seed=2, n_ignored=8)
    n = int((targets != -100).sum())
    kw = dict(engine="torch", chunk_bytes=7 * flp._row_bytes("torch", V, torch.float32), with_entropy=True)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            flp.fused_linear_logprob(h, w, targets, **kw)
    with FlopCounterMode(display=False) as general:
        lp, en = flp.fused_linear_logprob(h, w, targets, **kw)
        (lp.sum() + en.sum()).backward()
    with FlopCounterMode(display=False) as fused:
        loss, _, _ = flp.fused_linear_logprob_loss(h, w, targets, lambda lp, en, rows: lp.sum() + en.sum(), **kw)
        loss.backward()
    unit = n * V * H
    assert fwd.get_total_flops() == 2 * unit
    assert general.get_total_flops() == 8 * unit
    assert fused.get_total_flops() == 6 * unit


@pytest.mark.parametrize("entry", ENTRIES)
def test_cpu_engine_never_holds_the_logits(monkeypatch, entry):
    """Without the interpreter, CPU training takes the torch engine (auto), chunked like the
    kernels: forward + backward (the weight gradient into megatron's main_grad, as in training)
    stay under 1/10 of the fp32 logits' memory, counted from the allocations; the values are the
    oracle's."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    T, H, V = 512, 32, 4000
    assert flp._pick_engine("auto", torch.device("cpu")) == "torch"
    hidden, weight, targets, a, b = make_inputs(T, H, V, seed=13, n_ignored=20)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    w.main_grad = torch.zeros(V, H)
    af, bf = a.float(), b.float()
    budget = T * V * 4 // 20

    def step():
        if entry == "loss":
            loss, _, _ = flp.fused_linear_logprob_loss(h, w, targets, lambda lp, en, rows: (lp * af[rows] + en * bf[rows]).sum(),
                                                       with_entropy=True, chunk_bytes=budget)
        else:
            logp, entropy = flp.fused_linear_logprob(h, w, targets, with_entropy=True, chunk_bytes=budget)
            loss = (logp * af + entropy * bf).sum()
        loss.backward()

    peak = peak_bytes(step, h, w, w.main_grad, targets, af, bf)
    logits_fp32 = T * V * 4
    assert peak <= logits_fp32 / 10, f"peak {peak} B vs fp32 logits {logits_fp32} B"
    ref = expected(hidden, weight, targets, a, b)
    torch.testing.assert_close(h.grad.double(), ref[2], **FP32_TOL)
    torch.testing.assert_close(w.main_grad.double(), ref[3], **FP32_TOL)
    # and the materialised reference does hold them: the tracker can see the difference
    hh = hidden.float()
    assert peak_bytes(lambda: flp.linear_logprob_reference(hh, weight.float(), targets, with_entropy=True), hh) >= logits_fp32


# --- unwritten outputs show up ---------------------------------------------------------------


def _nan_empty(shape, *, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("entry", ENTRIES)
def test_poisoned_buffers_all_written(monkeypatch, entry):
    """Every buffer a kernel or matmul fills starts as NaN (the chunk buffer, the row statistics,
    grad_hidden): an element left unwritten fails the comparison."""
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    got, _ = check(entry, "triton", *make_inputs(37, 48, 203, seed=7))
    assert all(torch.isfinite(x).all() for x in got)


@pytest.mark.parametrize("kernel", ["stats", "grad"])
def test_poison_detects_a_skipped_row(monkeypatch, kernel):
    """The check above can fail: launch one program too few and the NaNs (or the stale logits)
    must surface."""
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    hidden, weight, targets, a, b = make_inputs(37, 48, 203, seed=8)
    real = flp._grid
    launches = []

    def short_grid(rows):
        launches.append(rows)
        (programs,) = real(rows)
        victim = kernel == "stats" and len(launches) == 1 or kernel == "grad" and len(launches) == 2
        return (programs - 1,) if victim else (programs,)

    monkeypatch.setattr(flp, "_grid", short_grid)
    got = run("loss", hidden.float(), weight.float(), targets, a, b, engine="triton",
              chunk_bytes=10 * flp._row_bytes("triton", 203, torch.float32))
    ref = expected(hidden, weight, targets, a, b)
    if kernel == "stats":
        assert torch.isnan(got[0][9])  # the first chunk's last row
    else:  # that row's logits were never turned into a gradient: grad_hidden row 9 is wrong
        assert not torch.allclose(got[2][9].double(), ref[2][9], **FP32_TOL)


# --- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["general", "loss", "reference"])
def test_bad_input_is_named(fn):
    call = {
        "general": flp.fused_linear_logprob,
        "loss": lambda h, w, t, **kw: flp.fused_linear_logprob_loss(h, w, t, lambda lp, en, r: lp.sum(), **kw),
        "reference": flp.linear_logprob_reference,
    }[fn]
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    bad = [
        ((torch.randn(4, 9), w, t), {}, "hidden size mismatch"),
        ((h, w, t[:3]), {}, "targets has 3 rows"),
        ((h, w, t.int()), {}, "int64"),
        ((h.bfloat16(), w, t), {}, "same dtype"),
        ((h[None], w, t), {}, r"\[T, H\]"),
        ((h, w[None], t), {}, r"\[V_local, H\]"),
        ((h, w, t[:, None]), {}, r"\[T\]"),
        ((h, w, torch.tensor([0, 1, 2, 10])), {}, "outside"),
        ((h, w, t), {"vocab_start": -1}, "vocab_start"),
        ((h, w, t), {"vocab_limit": 0}, "vocab_limit"),
        ((h, w, torch.tensor([0, 1, 2, 7])), {"vocab_limit": 6}, "outside"),
    ]
    if fn != "reference":
        bad += [
            ((h.double(), w.double(), t), {}, "not supported"),
            ((h, w, t), {"chunk_bytes": 10 * 4 - 1, "engine": "triton"}, "chunk_bytes"),
            ((h, w, t), {"chunk_bytes": 0}, "chunk_bytes"),
            ((h, w, t), {"engine": "cuda"}, "unknown engine"),
        ]
    for args, kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            call(*args, **kw)
    if fn == "loss":
        with pytest.raises(ValueError, match="token_loss"):
            flp.fused_linear_logprob_loss(h, w, t, None)
        with pytest.raises(ValueError, match="0-dim"):
            flp.fused_linear_logprob_loss(h, w, t, lambda lp, en, r: lp)


def test_triton_engine_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="engine='triton'"):
        flp.fused_linear_logprob(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), engine="triton")


# --- tensor parallel over gloo -----------------------------------------------------------------


def test_tp2_vocab_parallel_matches_full_vocab(tmp_path):
    """Two gloo ranks, each with a shard of the vocab (102 / 101 rows), both engines, both entry
    points; padding limits inside the second shard and below it (a shard that is all padding)."""
    cases = []
    for seed, scale, limit in ((11, 1.0, None), (12, 40.0, None), (13, 1.0, 150), (14, 1.0, 90)):
        hidden, weight, targets, a, b = make_inputs(37, 48, 203, seed=seed, scale=scale, n_ignored=3,
                                                    vocab_limit=limit)
        if limit is None:  # targets on both sides of the split, incl. the first and last ids
            targets[:6] = torch.tensor([0, 101, 102, 202, 5, 150])
        cases.append({"hidden": hidden.float(), "weight": weight.float(), "targets": targets, "a": a, "b": b,
                      "limit": -1 if limit is None else limit})
    torch.save(cases, tmp_path / "inputs.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), "--inputs", str(tmp_path / "inputs.pt"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for i, case in enumerate(cases):
        tol, grad_tol = (EXTREME_TOL, EXTREME_GRAD_TOL) if i == 1 else (FP32_TOL, None)
        limit = None if case["limit"] < 0 else case["limit"]
        ref = expected(case["hidden"], case["weight"], case["targets"], case["a"], case["b"], vocab_limit=limit)
        for rank, results in enumerate(ranks):
            shard = slice(results[i]["vocab_start"], results[i]["vocab_stop"])
            assert shard.stop - shard.start == (102, 101)[rank]
            for name, res in results[i]["runs"].items():
                what = f"case {i}, {name}, vocab {shard.start}:{shard.stop}"
                for key, r in (("logp", ref[0]), ("entropy", ref[1])):
                    torch.testing.assert_close(res[key].double(), r, **tol, msg=lambda m, w=f"{what} {key}": f"{w}: {m}")
                assert_grad_close(res["grad_hidden"], ref[2], tol, grad_tol, f"{what} grad_hidden")
                assert_grad_close(res["grad_weight"], ref[3][shard], tol, grad_tol, f"{what} grad_weight")


# --- GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_cuda_fp32(monkeypatch, with_entropy, entry):
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    for shape, chunk_rows in (((37, 48, 203), 7), ((1, 48, 203), 7), ((300, 200, 1003), 64)):
        check(entry, "triton", *make_inputs(*shape, n_ignored=min(3, shape[0] - 1), device="cuda",
                                            vocab_limit=shape[2] - 3),
              with_entropy=with_entropy, chunk_rows=chunk_rows, vocab_limit=shape[2] - 3)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ENTRIES)
def test_cuda_bf16_autotuned_large(monkeypatch, entry):
    """Autotuned tiles, a 32000-row vocab, bf16 logits; the weight gradient into an fp32
    main_grad by the fp32-accumulating GEMM (or its sliced fallback, reported)."""
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    hidden, weight, targets, a, b = make_inputs(4096, 1024, 32000, n_ignored=100, device="cuda", scale=2.0)
    z_max = float((hidden.bfloat16().double() @ weight.bfloat16().double().T).abs().max())
    ulp = 2.0 ** (math.floor(math.log2(z_max)) - 7)
    check(entry, "triton", hidden, weight, targets, a, b, dtype=torch.bfloat16, tol=dict(rtol=0.0, atol=ulp),
          grad_tol=2e-2, chunk_rows=1000)
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device="cuda")
    logp, entropy = flp.fused_linear_logprob(h, w, targets, with_entropy=True, chunk_bytes=1000 * 32000 * 2)
    (logp * a.float() + entropy * b.float()).sum().backward()
    ref16 = expected(hidden.bfloat16(), weight.bfloat16(), targets, a, b, round_bf16=True)
    assert_grad_close(w.main_grad, ref16[3], None, 2e-2, "main_grad")
    assert flp.LAST_WGRAD_PATH in ("addmm_out_dtype", "sliced")
    print(f"weight-gradient path on this GPU: {flp.LAST_WGRAD_PATH}")


@pytest.mark.gpu
def test_cuda_memory_within_a_tenth_of_fp32_logits():
    """torch.cuda.max_memory_allocated confirms the fake-tensor measurement (T=8192, the
    benchmark's token count, at half its hidden size)."""
    T, H, V = 8192, 2048, 151936
    dev = "cuda"
    h = (torch.randn(T, H, device=dev) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device=dev) * 0.02).bfloat16().requires_grad_()
    w.main_grad = torch.zeros(V, H, dtype=torch.float32, device=dev)
    t = torch.randint(0, V, (T,), device=dev)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logp, entropy = flp.fused_linear_logprob(h, w, t, with_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= T * V * 4 / 10, f"{peak / 2**20:.0f} MiB vs fp32 logits {T * V * 4 / 2**20:.0f} MiB"
