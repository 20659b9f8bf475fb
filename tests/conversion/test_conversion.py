"""HF -> Megatron -> HF is bit-exact at every layout; checkpoints reshard on load; bad input is
refused with a message that names the file and the fix; a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_prism.models.conversion import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_prism.models.conversion import convert as convert_module
from megatron_prism.models.errors import CheckpointError
from megatron_prism.models.qwen3vl.tiny import save_random_qwen3vl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "a": save_random_qwen3vl(root / "a", "a", seed=3),
        "b": save_random_qwen3vl(root / "b", "b", seed=4, dtype=torch.bfloat16),
    }


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_round_trip_is_bit_exact(variant, tp, pp, hf_dirs, tmp_path):
    src = hf_dirs[variant]
    mg = convert_hf_to_megatron(src, tmp_path / "mg", tp=tp, pp=pp)
    manifest = json.loads((mg / "prism_checkpoint.json").read_text())
    assert (manifest["tp"], manifest["pp"]) == (tp, pp)
    assert len(list(mg.glob("mp_rank_*.safetensors"))) == tp * pp
    back = convert_megatron_to_hf(mg, tmp_path / "hf")
    original, restored = _weights(src), _weights(back)
    assert list(sorted(original)) == list(sorted(restored))
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype, name
        assert torch.equal(restored[name], tensor), name
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_megatron_checkpoint_reshards_on_load(hf_dirs, tmp_path):
    """Saved at TP=2 x PP=2, loaded at TP=1: the same logits as building from the HF directory."""
    from megatron_prism.models import build_policy

    mg = convert_hf_to_megatron(hf_dirs["a"], tmp_path / "mg", tp=2, pp=2)
    ids = torch.randint(0, 240, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_hf = build_policy(hf_dirs["a"]).eval()(ids)
        from_mg = build_policy(mg).eval()(ids)
    assert torch.equal(from_hf, from_mg)


def test_rerun_into_same_output_is_a_no_op_but_a_different_one_is_refused(hf_dirs, tmp_path):
    out = tmp_path / "mg"
    convert_hf_to_megatron(hf_dirs["a"], out, tp=2)
    stamp = (out / "prism_checkpoint.json").stat().st_mtime_ns
    convert_hf_to_megatron(hf_dirs["a"], out, tp=2)  # same source, same layout: nothing to do
    assert (out / "prism_checkpoint.json").stat().st_mtime_ns == stamp
    with pytest.raises(CheckpointError, match="already holds .* different checkpoint"):
        convert_hf_to_megatron(hf_dirs["a"], out, tp=1)
    with pytest.raises(CheckpointError, match="already holds .* different checkpoint"):
        convert_hf_to_megatron(hf_dirs["b"], out, tp=2)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_weights(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["a"], tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"bad: no model.safetensors.*must hold the safetensors"):
        convert_hf_to_megatron(bad, tmp_path / "out")


def test_truncated_weights(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["a"], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*truncated or corrupt"):
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_qwen3vl(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["a"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: model_type is 'llama'.*Qwen3-VL"):
        convert_hf_to_megatron(bad, tmp_path / "out")


def test_shape_does_not_match_config(hf_dirs, tmp_path):
    bad = _copy(hf_dirs["a"], tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj.weight has shape \[127, 64\] but config.json implies \[128, 64\]"):
        convert_hf_to_megatron(bad, tmp_path / "out")


@pytest.mark.parametrize("tp,what", [(3, "num_attention_heads"), (4, "num_key_value_heads")])
def test_tp_must_divide(hf_dirs, tmp_path, tp, what):
    with pytest.raises(CheckpointError, match=f"tensor-parallel size {tp} does not divide {what}"):
        convert_hf_to_megatron(hf_dirs["a"], tmp_path / "out", tp=tp)


def test_crash_mid_write_leaves_no_checkpoint(hf_dirs, tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert_module, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        convert_hf_to_megatron(hf_dirs["a"], tmp_path / "out", tp=2)
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []  # the temporary directory is gone too


def test_megatron_checkpoint_with_truncated_shard(hf_dirs, tmp_path):
    mg = convert_hf_to_megatron(hf_dirs["a"], tmp_path / "mg", tp=2)
    shard = mg / "mp_rank_01_000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"mp_rank_01_000.safetensors: .*truncated"):
        convert_megatron_to_hf(mg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_command_line_tools(hf_dirs, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(hf_dirs["b"]),
         "--out", str(tmp_path / "mg"), "--tp", "2", "--pp", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    back = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_megatron_to_hf.py"), "--megatron-dir", str(tmp_path / "mg"),
         "--out", str(tmp_path / "hf")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert back.returncode == 0, back.stderr
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", str(tmp_path / "nope"),
         "--out", str(tmp_path / "x"), "--tp", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert bad.returncode == 2
    assert "error:" in bad.stderr and "nope/config.json: no config.json" in bad.stderr
    assert "Traceback" not in bad.stderr
