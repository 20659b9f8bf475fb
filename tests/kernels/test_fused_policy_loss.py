"""Fused Triton policy loss and its pure-torch reference, both against a float64 oracle written out
in this file (``oracle_policy_loss``: PPO / dual clip / GSPO / KL formulas from the papers and
verl's ``compute_policy_loss`` / ``kl_penalty``, differentiated by autograd), never imported from
the module under test.

Tolerances (fused fp32 vs reference float64 on the same fp32-representable inputs):
* gradient, elementwise: rtol 1e-5, atol 1e-6 * that token's gradient magnitude
  (row_scale * (|A| * ratio + kl_coef * a bound on |d kl / d logp|)), 0 for masked-out tokens;
* loss and sum statistics: rtol 1e-5, atol 1e-6 * scale, scale = sum over masked-in tokens of the
  magnitude of the summed terms (so cancellation in a mixed-sign sum is not held to a relative bound);
* counts (tokens, clipped, clipped_lower): exact; ratio_max / ratio_min: rtol 1e-5 (exact for +-inf).
bf16 on GPU: same for loss and stats (the kernel computes in fp32 from the same bf16 values); the
gradient is stored in bf16, so rtol 1e-2, atol 1e-2 * the token's gradient magnitude.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernels.fused_policy_loss as fpl
from kernels.fused_policy_loss import (
    KL_KINDS, STAT_NAMES, fused_policy_loss, policy_loss_reference, sequence_log_ratio,
)
from tests.kl_oracle import kl_estimate as oracle_kl

INF = math.inf
# the CPU-run tests use the interpreter; on a CUDA machine (no interpreter) they run on the GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 37), (1, 1), (5, 1000)]
COUNTS = ("tokens", "clipped", "clipped_lower")
SUMS = ("neg_log_ratio", "ratio_sum", "kl")

# name -> (keyword arguments, sequence mode?)
CONFIGS: dict[str, tuple[dict, bool]] = {
    "ppo": (dict(clip_low=0.2, clip_high=0.2), False),
    "dapo": (dict(clip_low=0.2, clip_high=0.28), False),
    "dual": (dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0), False),
    "noclip": (dict(clip_low=INF, clip_high=INF), False),
    "noclip_dual": (dict(clip_low=INF, clip_high=INF, dual_clip=3.0), False),
    "k1": (dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_kind="k1"), False),
    "abs": (dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_kind="abs"), False),
    "k2": (dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_kind="k2"), False),
    "k3": (dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_kind="k3"), False),
    "k3+": (dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_kind="k3+"), False),
    "k1+": (dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_kind="k1+"), False),
    "abs+": (dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_kind="abs+"), False),
    "gspo_k3+": (dict(clip_low=3e-4, clip_high=4e-4, kl_coef=0.05, kl_kind="k3+"), True),
    "kl_coef_0": (dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, kl_kind="k3"), False),
    "gspo": (dict(clip_low=3e-4, clip_high=4e-4), True),
    "gspo_wide_dual_k3": (dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1), True),
    "gspo_noclip": (dict(clip_low=INF, clip_high=INF), True),
}


# ------------------------------------------------------------------------------------ the oracle
def oracle_policy_loss(logp, old_logp, advantages, mask, row_scale, *, clip_low, clip_high, dual_clip=None,
                       seq_log_ratio=None, ref_logp=None, kl_coef=0.0, kl_kind="k3"):
    """float64 loss ``sum_{b,t} mask * row_scale[b] * L`` and the statistics, from the formulas.

    L = max(-A r, -A clip(r, 1 - lo, 1 + hi)) [then min(., -A c) where A < 0] + kl_coef * kl, with
    r = exp(clamp(logp - old, +-20)) (PPO), or for GSPO r = exp(min(sg(s_b) + logp - sg(logp), 10)):
    the sequence ratio's value with a per-token gradient of one."""
    keep = mask != 0
    if seq_log_ratio is None:
        log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    else:
        log_ratio = (seq_log_ratio.detach()[:, None] + logp - logp.detach()).clamp(max=10.0)
    ratio = log_ratio.exp()
    surrogate = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(surrogate, clipped)
    lower = torch.zeros_like(keep)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        lower = (advantages < 0) & (loss_tok > bound)
        loss_tok = torch.where(advantages < 0, torch.minimum(loss_tok, bound), loss_tok)
    kl = torch.zeros_like(loss_tok)
    if ref_logp is not None and kl_coef != 0.0:
        kl = oracle_kl(logp, ref_logp, kl_kind)
        loss_tok = loss_tok + kl_coef * kl
    loss = torch.where(keep, row_scale[:, None] * loss_tok, 0.0).sum()
    d = {k: v.detach() for k, v in (("lr", log_ratio), ("ratio", ratio), ("kl", kl))}
    stats = {
        "tokens": keep.sum().double(), "clipped": (keep & (clipped > surrogate)).sum().double(),
        "clipped_lower": (keep & lower).sum().double(),
        "neg_log_ratio": torch.where(keep, -d["lr"], 0.0).sum(), "ratio_sum": torch.where(keep, d["ratio"], 0.0).sum(),
        "ratio_max": torch.where(keep, d["ratio"], -INF).max() if keep.any() else torch.tensor(-INF),
        "ratio_min": torch.where(keep, d["ratio"], INF).min() if keep.any() else torch.tensor(INF),
        "kl": torch.where(keep, d["kl"], 0.0).sum(),
    }
    return loss, stats


def make_inputs(B: int, T: int, seed: int, device: str = DEVICE, dtype: torch.dtype = torch.float32,
                seq_mode: bool = False) -> dict:
    """Random inputs that hit every branch: both clip sides, the +-20 clamp, dual clip, k3 clamps,
    exact ties (ratio 1, ref == logp, A == 0), masked tails and an all-masked row."""
    g = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.rand(*s, generator=g)

    def randn(*s):
        return torch.randn(*s, generator=g)

    logp = -4.0 * rand(B, T)
    delta = 0.4 * randn(B, T)
    sign = torch.where(rand(B, T) < 0.5, -1.0, 1.0)
    delta = torch.where(rand(B, T) < 0.06, sign * (15.0 + 15.0 * rand(B, T)), delta)  # +-20 clamp
    delta = torch.where(rand(B, T) < 0.06, sign * (1.0 + 2.0 * rand(B, T)), delta)  # dual clip zone
    delta = torch.where(rand(B, T) < 0.05, torch.zeros_like(delta), delta)  # ratio exactly 1
    old_logp = logp - delta
    adv = randn(B, T)
    adv = torch.where(rand(B, T) < 0.03, torch.zeros_like(adv), adv)
    ref = logp + 1.5 * randn(B, T)
    ref = torch.where(rand(B, T) < 0.05, logp + sign * (20.0 + 10.0 * rand(B, T)), ref)
    ref = torch.where(rand(B, T) < 0.05, logp, ref)  # abs/k1 at exactly 0
    mask = rand(B, T) < 0.85
    if B == 1 and T == 1:
        mask[:] = True
    if B > 1:
        mask[1] = False  # an all-masked sequence
        mask[0, T // 2:] = False  # a padded tail
    lens = mask.sum(-1).clamp(min=1).float()
    # seq-mean-token-mean weights on even seeds, token-mean on odd ones
    row_scale = 1.0 / (lens * B) if seed % 2 == 0 else torch.full((B,), 1.0 / max(int(mask.sum()), 1))
    out = dict(logp=logp, old_logp=old_logp, advantages=adv, mask=mask, row_scale=row_scale,
               ref_logp=ref)
    if seq_mode:
        s = sequence_log_ratio(logp, old_logp, mask)
        if B > 1:
            s[-1] = 12.0  # above the GSPO clamp at 10: no gradient through the ratio
        if B > 2:
            s[0] = -0.25
        out["seq_log_ratio"] = s
    out = {k: v.to(device) for k, v in out.items()}
    for k in ("logp", "old_logp", "advantages", "ref_logp"):
        out[k] = out[k].to(dtype)
    return out


def _call(fn, inputs: dict, cfg: dict, dtype: torch.dtype | None = None):
    """Run ``fn`` with logp as a fresh leaf; returns (loss, stats, grad)."""
    x = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    logp = x.pop("logp").clone().requires_grad_(True)
    kw = dict(cfg)
    if "kl_coef" not in kw:
        x.pop("ref_logp")
    kw.update({k: x.pop(k) for k in ("ref_logp", "seq_log_ratio") if k in x})
    loss, stats = fn(logp, x["old_logp"], x["advantages"], x["mask"], x["row_scale"], **kw)
    loss.backward()
    return loss.detach(), stats, logp.grad


def _scales(inputs: dict, cfg: dict) -> dict:
    """Magnitude of each summed quantity (sum of |term| over masked-in tokens) and of each gradient
    element (a [B, T] tensor), for absolute tolerances."""
    d = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    keep = d["mask"] != 0
    if "seq_log_ratio" in d:
        lr = d["seq_log_ratio"][:, None].clamp(max=10.0).expand_as(d["logp"])
    else:
        lr = (d["logp"] - d["old_logp"]).clamp(-20.0, 20.0)
    ratio = lr.exp()
    kl = torch.zeros_like(ratio)
    if cfg.get("kl_coef", 0.0) != 0.0:
        kl = oracle_kl(d["logp"], d["ref_logp"], cfg.get("kl_kind", "k3")).abs()
    rs = d["row_scale"].abs()[:, None]
    kl_coef = abs(cfg.get("kl_coef", 0.0))
    term = (d["advantages"].abs() * torch.maximum(ratio, torch.ones_like(ratio)) * 2.0 + kl_coef * kl) * rs
    # per-token gradient magnitude: |A| * ratio for the surrogate, a bound on |d kl / d logp| for KL
    if kl_coef:
        x = d["logp"] - d["ref_logp"]
        dkl = 1.0 + x.abs() + (-x).clamp(-20.0, 20.0).exp()
    else:
        dkl = torch.zeros_like(ratio)
    grad_mag = torch.where(keep, (d["advantages"].abs() * ratio + kl_coef * dkl) * rs, 0.0)

    def s(x):
        return float(torch.where(keep, x, 0.0).sum()) + 1e-30

    return {"loss": s(term), "neg_log_ratio": s(lr.abs()), "ratio_sum": s(ratio), "kl": s(kl),
            "grad": grad_mag}


def check_against_reference(inputs: dict, cfg: dict, grad_rtol: float = 1e-5, grad_atol: float = 1e-6) -> None:
    """The fused kernel (fp32 maths) and, tightly, the module's float64 reference, both against the
    float64 oracle of this file."""
    r_loss, r_stats, r_grad = _call(oracle_policy_loss, inputs, cfg, dtype=torch.float64)
    m_loss, m_stats, m_grad = _call(policy_loss_reference, inputs, cfg, dtype=torch.float64)
    torch.testing.assert_close(m_loss, r_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m_grad, r_grad, rtol=1e-12, atol=1e-15)
    for k in STAT_NAMES:
        torch.testing.assert_close(m_stats[k].double(), r_stats[k].double(), rtol=1e-6, atol=1e-6 * max(abs(float(r_stats[k])), 1.0) if k not in ("ratio_max", "ratio_min") else 0.0)
    loss, stats, grad = _call(fused_policy_loss, inputs, cfg)
    sc = _scales(inputs, cfg)
    assert loss.dtype == torch.float32 and grad.dtype == inputs["logp"].dtype
    assert set(stats) == set(STAT_NAMES) == set(r_stats)
    torch.testing.assert_close(loss.double(), r_loss, rtol=1e-5, atol=1e-6 * sc["loss"])
    for k in COUNTS:
        assert stats[k].dtype == torch.float32 and stats[k].dim() == 0
        assert stats[k].item() == r_stats[k].item(), k
    for k in SUMS:
        torch.testing.assert_close(stats[k].double(), r_stats[k].double(), rtol=1e-5, atol=1e-6 * sc[k],
                                   msg=lambda m, k=k: f"{k}: {m}")
    for k in ("ratio_max", "ratio_min"):
        torch.testing.assert_close(stats[k].double(), r_stats[k].double(), rtol=1e-5, atol=0.0)
    # elementwise: |g - g_ref| <= rtol * |g_ref| + atol * (this token's gradient magnitude)
    err = (grad.double() - r_grad).abs()
    bound = grad_rtol * r_grad.abs() + grad_atol * sc["grad"]
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} gradient elements off, first at {bad.nonzero()[0].tolist()}: "
                           f"fused {grad[bad][0].item()} vs reference {r_grad[bad][0].item()}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name: str, shape: tuple[int, int]) -> None:
    cfg, seq_mode = CONFIGS[name]
    seed = 1000 * shape[0] + shape[1] + len(name)
    check_against_reference(make_inputs(*shape, seed=seed, seq_mode=seq_mode), cfg)


def test_inputs_cover_every_branch() -> None:
    """The random inputs of the (5, 1000) case really hit the branches the comparisons are about."""
    x = make_inputs(5, 1000, seed=5000, seq_mode=True)
    keep, A = x["mask"], x["advantages"]
    diff = x["logp"] - x["old_logp"]
    ratio = diff.clamp(-20, 20).exp()
    for hit in (diff > 20, diff < -20, diff == 0, A == 0, x["ref_logp"] == x["logp"],
                (A > 0) & (ratio > 1.28), (A > 0) & (ratio < 0.8), (A < 0) & (ratio > 1.28),
                (A < 0) & (ratio < 0.8), (A < 0) & (ratio > 3.0), x["ref_logp"] - x["logp"] > 20,
                (x["ref_logp"] - x["logp"] > 2.6) & (x["ref_logp"] - x["logp"] < 20)):
        assert (hit & keep).any()
    assert (x["seq_log_ratio"] > 10).any() and not keep[1].any()


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("seq_mode", [False, True])
def test_ratio_exactly_one(dual_clip: float | None, seq_mode: bool) -> None:
    """logp == old_logp (first on-policy step): every ratio is 1, the max() ties everywhere."""
    x = make_inputs(3, 37, seed=11, seq_mode=seq_mode)
    x["old_logp"] = x["logp"].clone()
    if seq_mode:
        x["seq_log_ratio"] = sequence_log_ratio(x["logp"], x["old_logp"], x["mask"])
        assert torch.equal(x["seq_log_ratio"], torch.zeros(3, device=DEVICE))
    cfg = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    loss, stats, grad = _call(fused_policy_loss, x, cfg)
    _, _, r_grad = _call(oracle_policy_loss, x, cfg, dtype=torch.float64)
    expected = torch.where(x["mask"], -x["advantages"].double() * x["row_scale"].double()[:, None], 0.0)
    torch.testing.assert_close(r_grad, expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(grad.double(), r_grad, rtol=1e-6, atol=0.0)
    assert stats["clipped"].item() == 0 and stats["ratio_max"].item() == stats["ratio_min"].item() == 1.0
    check_against_reference(x, cfg)


def _poisoned_alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def test_poisoned_buffers_are_fully_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradient and partials start as NaN: any element the kernel does not write would show up.
    The negative control skips the last block and checks that the poison then does show up."""
    monkeypatch.setattr(fpl, "_alloc", _poisoned_alloc)
    cfg = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_kind="k3")
    x = make_inputs(5, 1000, seed=3)  # 5000 tokens: 5 blocks of 1024, the last one partial
    check_against_reference(x, cfg)
    loss, stats, grad = _call(fused_policy_loss, x, cfg)
    assert torch.isfinite(grad).all() and all(torch.isfinite(stats[k]) for k in SUMS + COUNTS)

    monkeypatch.setattr(fpl, "_grid", lambda num_blocks: (num_blocks - 1,))
    loss, stats, grad = _call(fused_policy_loss, x, cfg)
    done = 4 * fpl.BLOCK
    assert -(-5000 // fpl.BLOCK) == 5, "the negative control assumes BLOCK = 1024"
    assert torch.isnan(grad.flatten()[done:]).all() and torch.isfinite(grad.flatten()[:done]).all()
    assert torch.isnan(loss) and torch.isnan(stats["tokens"])


def test_all_masked_and_empty() -> None:
    x = make_inputs(3, 37, seed=4)
    x["mask"] = torch.zeros_like(x["mask"])
    for fn in (fused_policy_loss, policy_loss_reference, oracle_policy_loss):
        loss, stats, grad = _call(fn, x, dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0))
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
        assert stats["ratio_max"].item() == -INF and stats["ratio_min"].item() == INF
        assert all(stats[k].item() == 0.0 for k in COUNTS + SUMS)
    e = torch.zeros(2, 0, device=DEVICE)
    loss, stats = fused_policy_loss(e, e, e, e.bool(), torch.ones(2, device=DEVICE), clip_low=0.2,
                                    clip_high=0.2)
    assert loss.item() == 0.0 and stats["ratio_max"].item() == -INF


def test_float_mask_grad_output_and_no_grad() -> None:
    x = make_inputs(3, 37, seed=6)
    cfg = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_kind="k2")
    loss_b, stats_b, grad_b = _call(fused_policy_loss, x, cfg)
    loss_f, stats_f, grad_f = _call(fused_policy_loss, {**x, "mask": x["mask"].float()}, cfg)
    assert torch.equal(loss_b, loss_f) and torch.equal(grad_b, grad_f)
    assert all(torch.equal(stats_b[k], stats_f[k]) for k in STAT_NAMES)
    logp = x["logp"].clone().requires_grad_(True)
    loss, _ = fused_policy_loss(logp, x["old_logp"], x["advantages"], x["mask"], x["row_scale"],
                                ref_logp=x["ref_logp"], **cfg)
    (-2.5 * loss).backward()
    torch.testing.assert_close(logp.grad, -2.5 * grad_b, rtol=1e-6, atol=0.0)
    loss_ng, _ = fused_policy_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"], x["row_scale"],
                                   ref_logp=x["ref_logp"], **cfg)  # no grad wanted: no gradient buffer
    assert not loss_ng.requires_grad and torch.equal(loss_ng, loss_b)
    with torch.no_grad():
        loss_ng, _ = fused_policy_loss(logp, x["old_logp"], x["advantages"], x["mask"], x["row_scale"],
                                       ref_logp=x["ref_logp"], **cfg)
    assert not loss_ng.requires_grad and torch.equal(loss_ng, loss_b)


@pytest.mark.parametrize("name", ["dual", "k3", "k3+", "gspo_wide_dual_k3"])
def test_bf16_interpreter(name: str) -> None:
    """bf16 inputs (loaded natively, computed in fp32, gradient stored in bf16)."""
    cfg, seq_mode = CONFIGS[name]
    x = make_inputs(5, 1000, seed=21, dtype=torch.bfloat16, seq_mode=seq_mode)
    check_against_reference(x, cfg, grad_rtol=1e-2, grad_atol=1e-2)


def test_large_shape_interpreter() -> None:
    """B=64, T=4096 (256 programs) on the CPU interpreter, one config (about 4 s)."""
    x = make_inputs(64, 4096, seed=22, seq_mode=False)
    check_against_reference(x, CONFIGS["k3+"][0])


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_gradient_per_token_closed_form(kind: str) -> None:
    """With A = 0 only the KL term is left: d loss / d logp = row_scale * kl_coef * k'(logp - ref),
    where k' is written here by hand (the "+" kinds: logp - ref, the gradient of k2)."""
    x = make_inputs(3, 37, seed=31)
    x["advantages"] = torch.zeros_like(x["advantages"])
    cfg = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.5, kl_kind=kind)
    diff = (x["logp"] - x["ref_logp"]).double()
    k3_raw = (-diff).clamp(-20, 20).exp() + diff - 1
    d_kl = {"k1": torch.ones_like(diff), "abs": diff.sign(), "k2": diff,
            "k3": torch.where((diff.abs() <= 20) & (k3_raw.abs() <= 10), 1 - (-diff).exp(), 0.0)}
    expected = diff if kind.endswith("+") else d_kl[kind]
    expected = torch.where(x["mask"], 0.5 * x["row_scale"].double()[:, None] * expected, 0.0)
    for fn, tol in ((fused_policy_loss, 1e-6), (policy_loss_reference, 1e-6)):
        _, _, grad = _call(fn, x, cfg)
        torch.testing.assert_close(grad.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_sequence_log_ratio() -> None:
    x = make_inputs(4, 23, seed=9)
    s = sequence_log_ratio(x["logp"].requires_grad_(True), x["old_logp"], x["mask"])
    assert not s.requires_grad and s.shape == (4,) and s[1].item() == 0.0  # row 1 is all masked
    for b in range(4):
        m = x["mask"][b]
        if m.any():
            want = (x["logp"][b][m].double() - x["old_logp"][b][m].double()).mean()
            torch.testing.assert_close(s[b].double(), want, rtol=1e-5, atol=1e-6)


def test_validation_errors() -> None:
    x = make_inputs(2, 5, seed=10)
    args = (x["logp"], x["old_logp"], x["advantages"], x["mask"], x["row_scale"])
    ok = dict(clip_low=0.2, clip_high=0.2)
    bad = [
        ((x["logp"], x["old_logp"][:, :4], *args[2:]), ok, "old_logp"),
        ((*args[:4], torch.ones(3, device=DEVICE)), ok, "row_scale"),
        ((x["logp"][0], *args[1:]), ok, r"\[B, T\]"),
        (args, dict(ok, dual_clip=1.0), "dual_clip"),
        (args, dict(ok, dual_clip=0.5), "dual_clip"),
        (args, dict(ok, kl_kind="k4"), "kl_kind"),
        (args, dict(clip_low=-0.1, clip_high=0.2), "clip_low"),
        (args, dict(clip_low=0.1, clip_high=math.nan), "clip_high"),
        (args, dict(ok, seq_log_ratio=torch.zeros(2, 1, device=DEVICE)), "seq_log_ratio"),
        (args, dict(ok, ref_logp=torch.zeros(2, 4, device=DEVICE), kl_coef=0.1), "ref_logp"),
    ]
    for fn in (fused_policy_loss, policy_loss_reference):
        for a, kw, match in bad:
            with pytest.raises(ValueError, match=match):
                fn(*a, **kw)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(64, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["dapo", "dual", "noclip", "k1", "abs", "k2", "k3", "k3+", "k1+", "gspo",
                                  "gspo_wide_dual_k3", "gspo_k3+"])
def test_matches_reference_cuda(name: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    cfg, seq_mode = CONFIGS[name]
    x = make_inputs(*shape, seed=shape[0] + shape[1], device="cuda", dtype=dtype, seq_mode=seq_mode)
    tol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    check_against_reference(x, cfg, grad_rtol=tol[0], grad_atol=tol[1])


@pytest.mark.gpu
def test_deterministic_cuda() -> None:
    """Bitwise repeatable on a GPU: partials per program, reduced in a fixed order (no atomics).
    (Under the CPU interpreter programs run one after another, so this could not fail there.)"""
    x = make_inputs(64, 4096, seed=8, device="cuda")
    cfg = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_kind="k3+")
    runs = [_call(fused_policy_loss, x, cfg) for _ in range(3)]
    for loss, stats, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][2])
        assert all(torch.equal(stats[k], runs[0][1][k]) for k in STAT_NAMES)


@pytest.mark.gpu
def test_poison_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fpl, "_alloc", _poisoned_alloc)
    check_against_reference(make_inputs(64, 4096, seed=12, device="cuda"),
                            dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1))


@pytest.mark.parametrize("in_kernel", [True, False], ids=["triton_reduce", "torch_reduce"])
def test_both_partial_reductions(monkeypatch: pytest.MonkeyPatch, in_kernel: bool) -> None:
    """The per-program partials are reduced by one Triton program up to a block count, by torch
    beyond; both give the oracle's loss and statistics (5000 tokens: 5 blocks; the limit is moved
    so each path runs, with a 2-row reduction tile so the kernel loops)."""
    monkeypatch.setattr(fpl, "REDUCE_IN_KERNEL_MAX_BLOCKS", 5 if in_kernel else 4)
    monkeypatch.setattr(fpl, "REDUCE_BLOCK_ROWS", 2)
    check_against_reference(make_inputs(5, 1000, seed=41), CONFIGS["dual"][0])
