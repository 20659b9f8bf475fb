"""fused_linear_logprob (Triton) against a float64 materialised-logits reference.

Tolerances (stated once, used throughout):
  * fp32 kernel vs float64 reference: rtol 1e-5, atol 1e-5 on logp, entropy and both gradients
    (observed max abs errors ~1e-6 at these sizes).
  * extreme logits (|z| up to ~80): logp/entropy atol 1e-4, rtol 1e-5 (an fp32 logit of
    magnitude 80 alone carries ~5e-6 rounding; observed <= 1.6e-5 on logp ~ -100); gradients
    max |err| <= 2e-5 * max |ref| (grad_weight reaches ~120 there, as hidden is scaled ~25x, and
    its small entries have large relative error from cancellation; observed <= 4e-6 * max).
  * bf16 inputs vs float64 on the same (bf16-rounded) inputs: logp/entropy rtol 1e-5, atol 1e-4
    (the forward dot accumulates exactly-representable bf16 products in fp32); gradients
    rtol 2e-2, atol 2e-2 relative to the max |grad| (dz is rounded to bf16 before the backward dots,
    as in any bf16 tensor-core kernel).
On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
with small tiles so every dimension spans several blocks and a ragged last one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.fused_linear_logprob as flp

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "tp_worker.py"
SMALL = flp.Blocks(t=16, v=32, h=16)
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
EXTREME_TOL = dict(rtol=1e-5, atol=1e-4)
EXTREME_GRAD_TOL = 2e-5  # relative to max |grad|


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(flp, "BLOCKS", SMALL)


def make_inputs(T, H, V, *, seed=0, scale=1.0, n_ignored=0, device="cpu"):
    """float64 master copies; logits ~N(0, scale^2)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    targets = torch.randint(0, V, (T,), generator=g)
    if n_ignored:
        targets[torch.randperm(T, generator=g)[:n_ignored]] = flp.IGNORE_INDEX
    a = torch.randn(T, generator=g, dtype=torch.float64)
    b = torch.randn(T, generator=g, dtype=torch.float64)
    return [x.to(device) for x in (hidden, weight, targets, a, b)]


def run(fn, hidden, weight, targets, a, b, *, with_entropy, **kw):
    """Forward, then backward of a random linear combination; returns detached results."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    out = fn(hidden, weight, targets, with_entropy=with_entropy, **kw)
    logp, entropy = out if with_entropy else (out, None)
    loss = (logp * a.to(logp.dtype)).sum()
    if with_entropy:
        loss = loss + (entropy * b.to(entropy.dtype)).sum()
    loss.backward()
    ent = entropy.detach() if with_entropy else None
    return logp.detach(), ent, hidden.grad, weight.grad


def assert_grad_close(g, r, tol, grad_tol, what):
    """Elementwise rtol/atol, or (grad_tol given) max |err| <= grad_tol * max |ref|."""
    assert g.shape == r.shape, what
    if grad_tol is None:
        torch.testing.assert_close(g.double(), r, **tol, msg=lambda m: f"{what}: {m}")
    else:
        err, scale = (g.double() - r).abs().max().item(), r.abs().max().item()
        assert err <= grad_tol * scale, f"{what}: max err {err:.3g} > {grad_tol} * max |ref| {scale:.3g}"


def check(hidden, weight, targets, a, b, *, with_entropy, dtype=torch.float32, tol=FP32_TOL, grad_tol=None):
    """Kernel on `dtype` inputs vs the float64 reference on the same (rounded) inputs."""
    h, w = hidden.to(dtype), weight.to(dtype)
    got = run(flp.fused_linear_logprob, h, w, targets, a, b, with_entropy=with_entropy)
    ref = run(flp.linear_logprob_reference, h.double(), w.double(), targets, a, b, with_entropy=with_entropy)
    assert got[0].dtype == torch.float32 and got[0].shape == targets.shape
    torch.testing.assert_close(got[0].double(), ref[0], **tol, msg=lambda m: f"logp: {m}")
    if with_entropy:
        assert got[1].dtype == torch.float32
        torch.testing.assert_close(got[1].double(), ref[1], **tol, msg=lambda m: f"entropy: {m}")
    for name, g, r, x in (("grad_hidden", got[2], ref[2], h), ("grad_weight", got[3], ref[3], w)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_grad_close(g, r, tol, grad_tol, name)
    ignored = targets == flp.IGNORE_INDEX
    assert torch.all(got[0][ignored] == 0) and torch.all(got[2][ignored] == 0)
    if with_entropy:
        assert torch.all(got[1][ignored] == 0)
    return got, ref


# --- the float64 reference itself ------------------------------------------------------------


def test_reference_matches_log_softmax():
    hidden, weight, targets, *_ = make_inputs(9, 12, 23, n_ignored=2)
    logp, entropy = flp.linear_logprob_reference(hidden, weight, targets, with_entropy=True)
    ls = (hidden @ weight.T).log_softmax(-1)
    keep = targets != flp.IGNORE_INDEX
    torch.testing.assert_close(logp[keep], ls[keep].gather(1, targets[keep, None]).squeeze(1))
    torch.testing.assert_close(entropy[keep], -(ls.exp() * ls).sum(-1)[keep])


# --- fp32 correctness against float64 ----------------------------------------------------------


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("shape", [(37, 48, 203), (1, 48, 203), (20, 7, 17)], ids=["odd", "T1", "tiny"])
def test_fp32_matches_float64(shape, with_entropy):
    T, H, V = shape
    check(*make_inputs(T, H, V, n_ignored=min(3, T - 1), seed=T), with_entropy=with_entropy)


def test_all_rows_ignored():
    hidden, weight, targets, a, b = make_inputs(5, 16, 40)
    targets[:] = flp.IGNORE_INDEX
    got, _ = check(hidden, weight, targets, a, b, with_entropy=True)
    assert torch.all(got[3] == 0)


def test_empty_batch():
    hidden, weight, targets, a, b = make_inputs(0, 16, 40)
    logp, entropy, g_h, g_w = run(flp.fused_linear_logprob, hidden.float(), weight.float(), targets, a, b,
                                  with_entropy=True)
    assert logp.shape == entropy.shape == (0,) and g_h.shape == (0, 16)
    assert torch.all(g_w == 0)


def test_extreme_logits_finite_and_correct():
    # hidden scaled so the logits reach about +-80: a naive exp() would overflow fp32 (> 88.7)
    hidden, weight, targets, a, b = make_inputs(37, 48, 203, seed=3)
    z = hidden @ weight.T
    hidden = hidden * (80.0 / z.abs().max())
    # the argmax and the argmin as targets too: logp near 0 and near -160
    z = hidden @ weight.T
    targets[0], targets[1] = z[0].argmax(), z[1].argmin()
    got, ref = check(hidden, weight, targets, a, b, with_entropy=True, tol=EXTREME_TOL, grad_tol=EXTREME_GRAD_TOL)
    assert all(torch.isfinite(x).all() for x in got)
    assert ref[0][1] < -100  # the comparison did cover a hugely negative logp


def test_non_contiguous_inputs():
    hidden, weight, targets, a, b = make_inputs(21, 40, 75, n_ignored=2)
    h_nc = hidden.float().T.contiguous().T  # column-major
    w_nc = torch.stack([weight.float(), weight.float()], dim=2)[..., 0]  # stride 2
    t_nc = torch.stack([targets, targets], dim=1)[:, 0]
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or t_nc.is_contiguous())
    got = run(flp.fused_linear_logprob, h_nc, w_nc, t_nc, a, b, with_entropy=True)
    ref = run(flp.linear_logprob_reference, hidden, weight, targets, a, b, with_entropy=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, **FP32_TOL)


def test_only_one_input_requires_grad():
    hidden, weight, targets, a, _ = make_inputs(10, 16, 33)
    w = weight.float().requires_grad_()
    flp.fused_linear_logprob(hidden.float(), w, targets).mul(a.float()).sum().backward()
    ref_w = weight.clone().requires_grad_()
    flp.linear_logprob_reference(hidden, ref_w, targets).mul(a).sum().backward()
    torch.testing.assert_close(w.grad.double(), ref_w.grad, **FP32_TOL)


def test_bf16_matches_float64():
    check(*make_inputs(37, 48, 203, n_ignored=3, seed=5), with_entropy=True, dtype=torch.bfloat16,
          tol=dict(rtol=1e-5, atol=1e-4), grad_tol=2e-2)


# --- unwritten outputs show up ---------------------------------------------------------------


def _nan_empty(shape, *, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def test_poisoned_buffers_all_written(monkeypatch):
    """Every kernel-written buffer starts as NaN: any element left unwritten fails the comparison
    (the gradient accumulators too, which the kernels must initialise themselves)."""
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    got, _ = check(*make_inputs(37, 48, 203, n_ignored=3, seed=7), with_entropy=True)
    assert all(torch.isfinite(x).all() for x in got)


@pytest.mark.parametrize("kernel", ["forward", "grad_hidden", "grad_weight"])
def test_poison_detects_a_skipped_block(monkeypatch, kernel):
    """The check above can fail: launch one program too few and the NaNs must surface."""
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    hidden, weight, targets, a, b = make_inputs(37, 48, 203, seed=8)
    real_grid = flp._grid
    state = {"launch": 0}
    victim = {"forward": 0, "grad_hidden": 1, "grad_weight": 2}[kernel]

    def short_grid(n, block):
        (programs,) = real_grid(n, block)
        state["launch"] += 1
        return (programs - 1,) if state["launch"] - 1 == victim else (programs,)

    monkeypatch.setattr(flp, "_grid", short_grid)
    logp, entropy, g_h, g_w = run(flp.fused_linear_logprob, hidden.float(), weight.float(), targets, a, b,
                                  with_entropy=True)
    assert state["launch"] == 3
    poisoned = {"forward": logp, "grad_hidden": g_h, "grad_weight": g_w}[kernel]
    assert torch.isnan(poisoned).any()


# --- input validation and fallback -----------------------------------------------------------


@pytest.mark.parametrize("fn", [flp.fused_linear_logprob, flp.linear_logprob_reference])
def test_validation(fn):
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    bad = [
        ((torch.randn(4, 9), w, t), "hidden size mismatch"),
        ((h, w, t[:3]), "targets has 3 rows"),
        ((h, w, t.int()), "int64"),
        ((h.bfloat16(), w, t), "same dtype"),
        ((h[None], w, t), r"\[T, H\]"),
        ((h, w[None], t), r"\[V_local, H\]"),
        ((h, w, t[:, None]), r"\[T\]"),
        ((h, w, torch.tensor([0, 1, 2, 10])), "outside"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            fn(*args)
    with pytest.raises(ValueError, match="vocab_start"):
        fn(h, w, t, vocab_start=-1)
    if fn is flp.fused_linear_logprob:
        with pytest.raises(ValueError, match="not supported"):
            fn(h.double(), w.double(), t)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(flp, "_FusedLinearLogprob", None)  # would raise if used
    hidden, weight, targets, a, b = make_inputs(6, 8, 19)
    got = run(flp.fused_linear_logprob, hidden.float(), weight.float(), targets, a, b, with_entropy=True)
    ref = run(flp.linear_logprob_reference, hidden, weight, targets, a, b, with_entropy=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, **FP32_TOL)


# --- tensor parallel over gloo -----------------------------------------------------------------


def test_tp2_vocab_parallel_matches_full_vocab(tmp_path):
    cases = []
    for seed, scale in ((11, 1.0), (12, 40.0)):  # the second reaches |z| ~ 80 across shards
        hidden, weight, targets, a, b = make_inputs(37, 48, 203, seed=seed, scale=scale, n_ignored=3)
        # targets on both sides of the 102 / 101 split, incl. the first and last ids
        targets[:6] = torch.tensor([0, 101, 102, 202, 5, 150])
        cases.append({"hidden": hidden.float(), "weight": weight.float(), "targets": targets,
                      "a": a, "b": b})
    torch.save(cases, tmp_path / "inputs.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), "--inputs", str(tmp_path / "inputs.pt"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [ranks[r][0]["vocab_stop"] - ranks[r][0]["vocab_start"] for r in range(2)] == [102, 101]
    for i, case in enumerate(cases):
        tol, grad_tol = (FP32_TOL, None) if i == 0 else (EXTREME_TOL, EXTREME_GRAD_TOL)
        ref = run(flp.linear_logprob_reference, case["hidden"].double(), case["weight"].double(),
                  case["targets"], case["a"], case["b"], with_entropy=True)
        for rank in ranks:
            res = rank[i]
            shard = slice(res["vocab_start"], res["vocab_stop"])
            for name in ("fused", "reference"):  # the float64 TP reference must match tightly
                what = f"case {i}, {name}, vocab {shard.start}:{shard.stop}"
                t, gt = (tol, grad_tol) if name == "fused" else (FP32_TOL, None)
                for key, r in (("logp", ref[0]), ("entropy", ref[1])):
                    torch.testing.assert_close(res[f"{name}_{key}"].double(), r, **t,
                                               msg=lambda m, w=f"{what} {key}": f"{w}: {m}")
                assert_grad_close(res[f"{name}_grad_hidden"], ref[2], t, gt, f"{what} grad_hidden")
                assert_grad_close(res[f"{name}_grad_weight"], ref[3][shard], t, gt, f"{what} grad_weight")


# --- GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("blocks", [SMALL, flp.Blocks()], ids=["small", "default"])
def test_cuda_fp32(monkeypatch, blocks, with_entropy):
    monkeypatch.setattr(flp, "BLOCKS", blocks)
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    for shape in ((37, 48, 203), (1, 48, 203), (300, 200, 1003)):
        check(*make_inputs(*shape, n_ignored=min(3, shape[0] - 1), device="cuda"), with_entropy=with_entropy)


@pytest.mark.gpu
def test_cuda_bf16(monkeypatch):
    monkeypatch.setattr(flp, "BLOCKS", flp.Blocks())
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    check(*make_inputs(300, 200, 1003, n_ignored=3, device="cuda"), with_entropy=True, dtype=torch.bfloat16,
          tol=dict(rtol=1e-5, atol=1e-4), grad_tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large(monkeypatch, dtype):
    monkeypatch.setattr(flp, "BLOCKS", flp.Blocks())
    monkeypatch.setattr(flp, "_empty", _nan_empty)
    hidden, weight, targets, a, b = make_inputs(4096, 1024, 32000, n_ignored=100, device="cuda")
    if dtype == torch.float32:
        check(hidden, weight, targets, a, b, with_entropy=True, tol=dict(rtol=1e-5, atol=5e-5))
    else:
        check(hidden, weight, targets, a, b, with_entropy=True, dtype=dtype, tol=dict(rtol=1e-5, atol=2e-4),
              grad_tol=2e-2)
