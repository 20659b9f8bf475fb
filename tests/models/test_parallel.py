"""TP / PP / SP layouts, run under torchrun through megatron-core's own schedules (gloo on CPU).

* Logit parity with transformers at TP=2, TP=2 + sequence parallel, PP=2 (1F1B), TP=2 x PP=2.
* Logit parity through the interleaved schedule (PP=2 x VPP=2, forward only).
* Gradients: one forward-backward over several micro-batches (megatron DDP + finalize_model_grads)
  at TP=2, TP=2+SP with full recomputation, PP=2 (1F1B, untied and tied embeddings), gathered
  to HF tensors with the conversion map, equal to TP=1, PP=1 within fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from cases import assert_logp_entropy_match, hf_logits, make_case, relative_error, run_worker, standard_cases
from safetensors.torch import load_file

from megatron_prism.models.conversion import layout_maps
from megatron_prism.models.qwen3vl.config import read_hf_config

TOL = 1e-4


@pytest.mark.parametrize(
    "variant,nproc,flags",
    [
        ("a", 2, ["--tp", "2"]),
        ("b", 2, ["--tp", "2", "--sp"]),
        ("a", 2, ["--pp", "2"]),
        ("b", 4, ["--tp", "2", "--pp", "2"]),
    ],
    ids=["tp2", "tp2-sp", "pp2", "tp2xpp2"],
)
def test_logit_parity(variant, nproc, flags, tiny_dirs, hf_models, tmp_path):
    cases = standard_cases(seed=21, multiple_of=2)
    names = list(cases)
    torch.save([cases[n] for n in names], tmp_path / "inputs.pt")
    run_worker(nproc, "parity", tiny_dirs[variant], tmp_path / "inputs.pt", tmp_path / "out", *flags)
    got = load_file(tmp_path / "out" / "logits.safetensors")
    for i, name in enumerate(names):
        ref = hf_logits(hf_models[variant], cases[name])
        assert got[f"logits_{i}"].shape == ref.shape, name
        assert relative_error(got[f"logits_{i}"], ref, cases[name]) <= TOL, name


def test_logit_parity_interleaved(tiny_dirs, hf_models, tmp_path):
    # The interleaved schedule communicates one static shape: micro-batches of one length.
    cases = [
        make_case([[[1, 4, 4]], [[1, 2, 4]]], seed=41, length=24),
        make_case([[], [[1, 4, 4], [1, 2, 2]]], seed=42, length=24),
        make_case([[[1, 2, 6]], []], seed=43, pad_side="right", length=24),
        make_case([[], []], seed=44, length=24),
    ]
    torch.save(cases, tmp_path / "inputs.pt")
    run_worker(2, "parity", tiny_dirs["b"], tmp_path / "inputs.pt", tmp_path / "out", "--pp", "2", "--vpp", "2")
    got = load_file(tmp_path / "out" / "logits.safetensors")
    for i, case in enumerate(cases):
        assert relative_error(got[f"logits_{i}"], hf_logits(hf_models["b"], case), case) <= TOL, i


@pytest.mark.parametrize(
    "variant,flags", [("a", ["--tp", "2"]), ("b", ["--tp", "2", "--sp"])], ids=["tp2", "tp2-sp-tied"]
)
def test_fused_head_matches_transformers(variant, flags, tiny_dirs, hf_models, tmp_path):
    """The training head (fused vocab-parallel log-prob + entropy kernel) against log_softmax and
    the entropy of transformers' logits, float64."""
    cases = standard_cases(seed=23, multiple_of=2)
    names = list(cases)
    torch.save([cases[n] for n in names], tmp_path / "inputs.pt")
    run_worker(2, "parity", tiny_dirs[variant], tmp_path / "inputs.pt", tmp_path / "out", *flags, "--head", "triton")
    got = load_file(tmp_path / "out" / "logp_entropy.safetensors")
    for i, name in enumerate(names):
        assert_logp_entropy_match(got[f"logp_entropy_{i}"], hf_models[variant], cases[name])


def _grad_cases() -> list[dict]:
    # Four micro-batches of two samples each: images, several grids, and padding. One common
    # length, because megatron's interleaved schedule communicates a static tensor shape.
    return [
        make_case([[[1, 4, 4]], [[1, 2, 4]]], seed=31, length=24),
        make_case([[], [[1, 4, 4], [1, 2, 2]]], seed=32, length=24),
        make_case([[[1, 2, 6]], []], seed=33, pad_side="right", length=24),
        make_case([[], []], seed=34, length=24),
    ]


def _hf_grads(out_dir, hf_config, pp: int) -> dict[str, torch.Tensor]:
    """Per-rank gradient files (global megatron names) -> HF-named full gradients."""
    files = sorted(out_dir.glob("grads_tp*_pp*.safetensors"))
    by_rank: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for f in files:
        tp_rank = int(f.stem.split("_")[1][2:])
        pp_rank = int(f.stem.split("_")[2][2:])
        by_rank[(tp_rank, pp_rank)] = load_file(f)
    tp = 1 + max(t for t, _ in by_rank)
    grads: dict[str, torch.Tensor] = {}
    for m in layout_maps(hf_config, pp):
        shards = []
        for t in range(tp):
            found = [g[m.megatron] for (tr, _), g in by_rank.items() if tr == t and m.megatron in g]
            assert len(found) == 1, (m.megatron, t, len(found))
            shards.append(found[0])
        for name, tensor in zip(m.hf, m.unshard(shards)):
            grads.setdefault(name, tensor)  # a tied output copy repeats embed_tokens: keep one
    return grads


@pytest.fixture(scope="module")
def reference_grads(tiny_dirs, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("ref_grads")
    torch.save(_grad_cases(), root / "inputs.pt")
    for variant in "ab":
        run_worker(1, "grads", tiny_dirs[variant], root / "inputs.pt", root / variant)
        out[variant] = (_hf_grads(root / variant, read_hf_config(tiny_dirs[variant]), 1),
                        load_file(root / variant / "losses.safetensors"))
    return out


@pytest.mark.parametrize(
    "variant,nproc,flags,pp",
    [
        ("a", 2, ["--tp", "2"], 1),
        ("b", 2, ["--tp", "2", "--sp", "--recompute", "full"], 1),
        ("a", 2, ["--pp", "2"], 2),
        ("b", 2, ["--pp", "2"], 2),
        ("b", 2, ["--pp", "2", "--vpp", "2"], 2),
        ("a", 1, ["--head", "triton"], 1),
        ("a", 2, ["--tp", "2", "--head", "triton"], 1),
        ("b", 2, ["--tp", "2", "--sp", "--head", "triton"], 1),
        ("a", 2, ["--tp", "2", "--head", "torch"], 1),
        ("b", 2, ["--pp", "2", "--head", "triton"], 2),
    ],
    ids=["tp2", "tp2-sp-recompute", "pp2-1f1b", "pp2-1f1b-tied", "pp2-vpp2-interleaved", "fused-head",
         "tp2-fused-head", "tp2-sp-fused-head-tied", "tp2-torch-head", "pp2-fused-head-tied"],
)
def test_gradients_match_single_rank(variant, nproc, flags, pp, tiny_dirs, reference_grads, tmp_path):
    torch.save(_grad_cases(), tmp_path / "inputs.pt")
    run_worker(nproc, "grads", tiny_dirs[variant], tmp_path / "inputs.pt", tmp_path / "out", *flags)
    ref_grads, ref_losses = reference_grads[variant]
    losses = load_file(tmp_path / "out" / "losses.safetensors")
    for key, value in ref_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6)
    grads = _hf_grads(tmp_path / "out", read_hf_config(tiny_dirs[variant]), pp)
    assert set(grads) == set(ref_grads)
    nonzero = 0
    for name, ref in ref_grads.items():
        scale = max(float(ref.abs().max()), 1e-6)
        err = float((grads[name] - ref).abs().max()) / scale
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"
        nonzero += int(ref.abs().max() > 0)
    assert nonzero > 0.9 * len(ref_grads)  # the loss reaches (nearly) every parameter
