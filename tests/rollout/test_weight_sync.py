"""Weight export from a TP/PP-sharded policy to HF tensors, buckets, and flattened buckets.

* Under torchrun (gloo, CPU): at TP=2, PP=2, PP=2 x VPP=2 and TP=2 x PP=2 every rank's export
  equals the HF checkpoint the model was built from, bit for bit, with exactly the HF state-dict
  names (the tied variant ``b`` has no ``lm_head.weight``); ``dst_rank_only`` delivers the same
  tensors to the destination rank only; a change to one TP shard of a qkv weight lands in the
  rows of q, k and v that shard holds.
* In process: bucket limits, FlatBucket round trips (bf16/fp32 mixed), measure_export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_prism.rollout.weight_sync import FlatBucket, bucketize, flatten, tensor_bytes

WORKER = Path(__file__).resolve().parent / "export_worker.py"
REPO = Path(__file__).resolve().parents[2]

# (id, processes, layout flags, variants)
LAYOUTS = [
    ("tp2", 2, ["--tp", "2", "--perturb"], "ab"),
    ("pp2", 2, ["--pp", "2", "--perturb"], "ab"),
    ("pp2-vpp2", 2, ["--pp", "2", "--vpp", "2"], "b"),
    ("tp2xpp2", 4, ["--tp", "2", "--pp", "2", "--perturb"], "b"),
]


def _hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="module")
def exports(tiny_dirs, tmp_path_factory):
    """Run the export worker once per layout; {layout id: output dir}."""
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for name, nproc, flags, variants in LAYOUTS:
        out = root / name
        ckpts = [arg for v in variants for arg in ("--ckpt", str(tiny_dirs[v]))]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(WORKER), *ckpts, "--out", str(out), *flags]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        if proc.returncode != 0:
            raise AssertionError(f"export worker failed ({name}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        done[name] = (out, nproc, variants)
    return done


@pytest.mark.parametrize("layout", [layout[0] for layout in LAYOUTS])
def test_export_equals_hf_checkpoint(layout, exports, tiny_dirs):
    out, nproc, variants = exports[layout]
    for variant in variants:
        ref = _hf_state(tiny_dirs[variant])
        assert ("lm_head.weight" in ref) == (variant == "a")  # "b" is tied: HF drops lm_head
        vdir = out / tiny_dirs[variant].name
        for rank in range(nproc):
            info = json.loads((vdir / f"info_rank{rank}.json").read_text())
            assert len(info["order"]) == len(set(info["order"])), "a name was exported twice"
            assert set(info["order"]) == set(ref)
            got = load_file(vdir / f"full_rank{rank}.safetensors")
            assert set(got) == set(ref), (variant, rank)
            for name, tensor in ref.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (variant, rank, name)
            # dst_rank_only: everything on TP rank 0 of the first stage, nothing elsewhere.
            if info["tp_rank"] == 0 and info["pp_rank"] == 0:
                dst = load_file(vdir / f"dst_rank{rank}.safetensors")
                assert set(dst) == set(ref) and all(torch.equal(dst[n], t) for n, t in ref.items())
            else:
                assert info["dst"] == 0 and not (vdir / f"dst_rank{rank}.safetensors").exists()
        orders = {tuple(json.loads((vdir / f"info_rank{r}.json").read_text())["order"]) for r in range(nproc)}
        assert len(orders) == 1, "ranks exported in different orders"


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2xpp2"])
def test_export_shows_a_changed_tp_shard(layout, exports, tiny_dirs):
    """The worker added 1.0 to TP rank 1's shard of layer 0's packed qkv weight (stage 0). With
    TP=2 rank 1 holds the second query group: q heads [hpg, 2*hpg), the second k and v head."""
    out, nproc, variants = exports[layout]
    variant = variants[0]
    ref = _hf_state(tiny_dirs[variant])
    tc = json.loads((tiny_dirs[variant] / "config.json").read_text())["text_config"]
    hd, hpg = tc["head_dim"], tc["num_attention_heads"] // tc["num_key_value_heads"]
    groups = tc["num_key_value_heads"]
    p = "model.language_model.layers.0.self_attn"
    for rank in range(nproc):
        got = load_file(out / tiny_dirs[variant].name / f"perturbed_rank{rank}.safetensors")
        assert set(got) == {f"{p}.{x}_proj.weight" for x in "qkv"}
        for x, per_group in (("q", hpg * hd), ("k", hd), ("v", hd)):
            name = f"{p}.{x}_proj.weight"
            diff = got[name] - ref[name]
            if layout == "pp2":  # TP=1: no rank 1, nothing changed
                assert torch.equal(diff, torch.zeros_like(diff)), name
                continue
            rows = torch.zeros(diff.shape[0], dtype=torch.bool)
            rows[per_group * groups // 2:] = True  # rank 1 of 2 holds the second half of the groups
            assert torch.allclose(diff[rows], torch.ones_like(diff[rows])), name
            assert torch.equal(diff[~rows], torch.zeros_like(diff[~rows])), name


def test_export_speed_is_measured(exports, capsys):
    for layout, (out, nproc, variants) in exports.items():
        for rank in range(nproc):
            info = json.loads((next(iter(out.iterdir())) / f"info_rank{rank}.json").read_text())
            stats = info["measure"]
            assert stats["bytes"] > 0 and stats["seconds"] > 0 and stats["gb_per_s"] > 0
            with capsys.disabled():
                print(f"\n[export {layout} rank {rank}] {stats['bytes'] / 1e6:.2f} MB in "
                      f"{stats['seconds'] * 1e3:.1f} ms = {stats['gb_per_s']:.3f} GB/s")


# ---- buckets ------------------------------------------------------------------------------------


def _named(sizes, dtypes) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(f"t{i}", torch.randn(n, generator=gen).to(d)) for i, (n, d) in enumerate(zip(sizes, dtypes))]


def test_bucketize_respects_the_limit():
    named = _named([10, 30, 5, 100, 7, 7, 7, 60], [torch.float32] * 8)
    limit = 40 * 4
    buckets = list(bucketize(iter(named), limit))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]  # order and completeness
    for b in buckets:
        size = sum(tensor_bytes(t) for _, t in b)
        assert size <= limit or len(b) == 1  # an oversize tensor is a bucket of its own
    assert [len(b) for b in buckets] == [2, 1, 1, 3, 1]
    with pytest.raises(ValueError):
        next(bucketize(iter(named), 0))


def test_bucketize_on_an_exported_checkpoint(tiny_dirs):
    state = _hf_state(tiny_dirs["a"])
    limit = 64 << 10
    buckets = list(bucketize(state.items(), limit))
    assert len(buckets) > 3
    assert sum(len(b) for b in buckets) == len(state)
    assert all(sum(tensor_bytes(t) for _, t in b) <= limit or len(b) == 1 for b in buckets)


def test_flatten_round_trip_mixed_dtypes():
    named = _named([7, 12, 1, 33, 4], [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16])
    named.append(("matrix", torch.arange(12, dtype=torch.float32).reshape(3, 4)))
    named.append(("scalar", torch.tensor(2.5, dtype=torch.bfloat16)))
    named.append(("ints", torch.tensor([1, -2, 3], dtype=torch.int64)))
    flat = flatten(named)
    assert flat.buffer.dtype == torch.uint8 and flat.buffer.dim() == 1
    assert all(e.offset % 16 == 0 for e in flat.entries)
    back = flat.unflatten()
    assert [n for n, _ in back] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8),
                           b.reshape(-1).view(torch.uint8))


def test_flatten_one_dtype_uses_element_offsets():
    named = _named([3, 5, 2], [torch.bfloat16] * 3)
    flat = flatten(named)
    assert flat.buffer.dtype == torch.bfloat16 and flat.buffer.numel() == 10
    assert [(e.offset, e.numel) for e in flat.entries] == [(0, 3), (3, 5), (8, 2)]
    rebuilt = FlatBucket(flat.buffer.clone(), list(flat.entries)).unflatten()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, rebuilt))
    single = flatten(named[:1])
    single.buffer.zero_()  # a one-tensor bucket is still a copy, never the caller's tensor
    assert not torch.equal(named[0][1], torch.zeros_like(named[0][1]))
    with pytest.raises(ValueError):
        flatten([])
