"""Upcycling keeps the dense function; the tool; checkpoints; gradients and the aux loss; modes.

float32 throughout; "equal" means within 1e-5 of the largest magnitude compared.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from disc_cases import REPO, batch

from megatron_prism.models import build_policy
from megatron_prism.models.discriminator import (
    DiscriminatorSpec,
    build_discriminator,
    save_discriminator,
    upcycle_to_checkpoint,
)
from megatron_prism.models.discriminator.router import CAPTION, PROMPT, REASONING
from megatron_prism.models.errors import CheckpointError

TOL = 1e-5
TOOL = REPO / "tools" / "upcycle_discriminator.py"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _run(model, b):
    return model(b.input_ids, **b.model_inputs())


def test_upcycled_moe_equals_dense_model(tiny_dirs, disc_ckpt, tmp_path):
    """Top-2 of 4 experts, router noise and head dropout off: hidden states equal the dense
    policy's, and scores equal those of the dense-mode discriminator with the same head."""
    b = batch(seed=1, isolate_parts=False)
    policy = build_policy(tiny_dirs["a"]).eval()
    with torch.no_grad():
        dense_hidden = policy(b.input_ids, b.pixel_values, b.image_grid_thw, b.attention_mask, return_hidden=True)
    moe = build_discriminator(disc_ckpt, head_dropout=0.0, router_jitter=0.0).eval()
    assert len(moe.routers()) == 4
    with torch.no_grad():
        hidden = moe(b.input_ids, b.pixel_values, b.image_grid_thw, b.attention_mask, part_labels=b.part_labels)
        scores = _run(moe, b)
    keep = b.attention_mask.bool()
    assert _rel(hidden[keep], dense_hidden[keep]) <= TOL
    load = moe.moe_stats()["load"]
    assert (load > 0).sum(-1).min() >= 2, "the random router should spread tokens over several experts"

    dense_ckpt = upcycle_to_checkpoint(tiny_dirs["a"], tmp_path / "dense", DiscriminatorSpec(mode="dense"), seed=5)
    dense = build_discriminator(dense_ckpt, head_dropout=0.0).eval()
    assert not dense.routers()
    with torch.no_grad():
        assert _rel(scores, _run(dense, b)) <= TOL


def test_gradients_reach_router_and_head_and_aux_loss_scale(disc_ckpt):
    model = build_discriminator(disc_ckpt, head_dropout=0.1, router_jitter=0.0).train()
    b = batch(seed=2)
    (_run(model, b) * torch.tensor([1.0, -1.0])).sum().backward()
    assert model.score_head.weight.grad.abs().sum() > 0
    assert all(r.weight.grad.abs().sum() > 0 for r in model.routers())
    lb = model.moe_stats()["lb_loss"]
    assert ((lb > 0.9) & (lb < 2.0)).all(), lb  # switch loss: 1.0 when balanced

    def aux_only_grad(scale: float) -> torch.Tensor:
        model.zero_grad()
        model.set_aux_loss_scale(scale)
        torch.manual_seed(0)
        (_run(model, b) * 0).sum().backward()  # the scores contribute nothing: only the aux loss
        return model.routers()[0].weight.grad.clone()

    one, three = aux_only_grad(1.0), aux_only_grad(3.0)
    assert one.abs().sum() > 0 and model.score_head.weight.grad.abs().sum() == 0
    assert _rel(three, 3 * one) <= TOL


def test_save_and_load_round_trip(disc_ckpt, tmp_path):
    model = build_discriminator(disc_ckpt, head_dropout=0.0, router_jitter=0.0).eval()
    with torch.no_grad():
        model.score_head.weight.fill_(0.125)
        model.routers()[1].weight.mul_(-2.0)
    out = save_discriminator([model], tmp_path / "saved")
    meta = json.loads((out / "prism_checkpoint.json").read_text())["discriminator"]
    assert meta["initialised"] == [] and meta["spec"]["experts"] == 4
    again = build_discriminator(out, head_dropout=0.0, router_jitter=0.0).eval()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    b = batch(seed=4)
    with torch.no_grad():
        assert torch.equal(_run(model, b), _run(again, b))


def test_dedicated_groups_and_text_only(disc_ckpt):
    model = build_discriminator(disc_ckpt, mode="dedicated", router_jitter=0.0).eval()
    with torch.no_grad():
        _run(model, batch(seed=6))
    load = model.moe_stats()["load"]  # [layers, parts, experts]
    assert load[:, CAPTION, 2:].sum() == 0 and load[:, CAPTION, :2].sum() > 0
    assert load[:, REASONING, :2].sum() == 0 and load[:, REASONING, 2:].sum() > 0
    assert (load[:, PROMPT] > 0).any(-1).all()
    with pytest.raises(ValueError, match="part_labels"):
        b = batch(seed=6)
        model(b.input_ids, attention_mask=b.attention_mask)

    text = batch(seed=6, text_only=True)
    assert text.pixel_values is None and not (text.input_ids == 250).any()
    model = build_discriminator(disc_ckpt, mode="text-only", router_jitter=0.0).eval()
    with torch.no_grad():
        assert torch.isfinite(_run(model, text)).all()


def test_wrong_sources_are_errors(tiny_dirs, disc_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="no such discriminator checkpoint"):
        build_discriminator(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="upcycle"):
        build_discriminator(tiny_dirs["a"])  # a plain backbone: no head to load
    with pytest.raises(CheckpointError, match="dense"):
        build_discriminator(disc_ckpt, mode="dense")
    broken = tmp_path / "broken"
    shutil.copytree(disc_ckpt, broken)
    manifest = json.loads((broken / "prism_checkpoint.json").read_text())
    del manifest["weight_map"]["score_head.weight"]
    (broken / "prism_checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="missing"):
        build_discriminator(broken)


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_upcycle_tool(tiny_dirs, tmp_path):
    out = tmp_path / "tool"
    ok = _tool("--hf-dir", str(tiny_dirs["a"]), "--experts", "4", "--topk", "2", "--out", str(out), "--mode", "dedicated")
    assert ok.returncode == 0, ok.stderr
    model = build_discriminator(out)
    assert model.spec.mode == "dedicated" and model.spec.experts == 4

    mixed = tmp_path / "mixed"  # config of variant a, weights of variant b
    shutil.copytree(tiny_dirs["b"], mixed)
    shutil.copy(tiny_dirs["a"] / "config.json", mixed / "config.json")
    for bad, needle in ((["--hf-dir", str(tmp_path / "nowhere")], "config.json"),
                        (["--hf-dir", str(mixed)], "do not belong to this config"),
                        (["--hf-dir", str(tiny_dirs["a"]), "--topk", "5"], "topk"),
                        (["--hf-dir", str(out)], "already a discriminator")):
        res = _tool(*bad, "--out", str(tmp_path / "x"))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert lines[-1].startswith("error: ") and needle in lines[-1], lines
        assert not (tmp_path / "x").exists()


def test_every_mode_gets_prisms_upcycling_noise(tiny_dirs):
    """PRISM's create_vl_moe.py: each expert = dense MLP + N(0, noise_std), drawn once per expert;
    the dense mode's one MLP gets the same noise, so arms differ in routing only. Attention,
    norms and the vision tower are copied exactly."""
    from megatron_prism.models.discriminator.mapping import dense_mlp_hf_names, expert_hf_names
    from megatron_prism.models.discriminator.upcycle import UpcycleSource, backbone_source

    cfg, dense, _ = backbone_source(tiny_dirs["a"])
    plain = UpcycleSource(dense, cfg, DiscriminatorSpec(mode="dense"), seed=3)
    std = 0.01
    gate = dense_mlp_hf_names(1)["linear_fc1"][0]
    attn = "model.language_model.layers.1.self_attn.q_proj.weight"
    original = plain.get(gate).double()
    for mode in ("routed", "dense"):
        source = UpcycleSource(dense, cfg, DiscriminatorSpec(mode=mode), seed=3, expert_noise=std)
        names = [expert_hf_names(1, e)["linear_fc1"][0] for e in range(4)] if mode == "routed" else [gate]
        deltas = [source.get(n).double() - original for n in names]
        for d in deltas:
            assert abs(float(d.std()) / std - 1) < 0.1 and abs(float(d.mean())) < 3 * std / d.numel() ** 0.5, mode
        if mode == "routed":
            assert float((deltas[0] - deltas[1]).abs().max()) > std  # the experts differ from each other
        assert torch.equal(source.get(attn), plain.get(attn)), mode
