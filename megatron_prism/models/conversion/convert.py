"""HF <-> Megatron conversion and the weight sources ``build_policy`` loads from.

Both directions write into a temporary sibling directory and rename it into place when complete,
so a crash never leaves a half checkpoint under the requested name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_prism.models.conversion import megatron_format as mf
from megatron_prism.models.conversion.hf_io import (
    HFWeights,
    check_hf_shapes,
    copy_non_weight_files,
    fsync_dir,
    write_hf_weights,
)
from megatron_prism.models.conversion.mapping import (
    ParamMap,
    all_maps,
    expected_lm_shapes,
    expected_vision_shapes,
    place,
    spec_name,
)
from megatron_prism.models.errors import CheckpointError
from megatron_prism.models.qwen3vl.config import check_layout, read_hf_config


def layout_maps(hf_config, pp: int) -> list[ParamMap]:
    """The parameters a model split into ``pp`` stages has (a tied model without pipeline
    stages has no separate output weight)."""
    maps = all_maps(hf_config, list(expected_vision_shapes(hf_config)))
    if hf_config.tie_word_embeddings and pp == 1:
        maps = [m for m in maps if m.megatron != "language_model.output_layer.weight"]
    return maps


class HFSource:
    """Shards read straight from a Hugging Face directory."""

    def __init__(self, hf_dir: str | Path, hf_config) -> None:
        self.weights = HFWeights(hf_dir)
        check_hf_shapes(self.weights, {**expected_lm_shapes(hf_config), **expected_vision_shapes(hf_config)})

    def shard(self, m: ParamMap, tp_rank: int, tp_size: int) -> torch.Tensor:
        return m.shard([self.weights.get(n) for n in m.hf], tp_rank, tp_size)


def open_source(path: str | Path):
    """(hf_config, weight source, hf-files dir) for a HF directory or a megatron_prism checkpoint."""
    path = Path(path)
    if mf.is_megatron_checkpoint(path):
        hf_dir = path / mf.HF_SUBDIR
        cfg = read_hf_config(hf_dir)
        manifest = mf.read_manifest(path)
        return cfg, mf.MegatronWeights(path, layout_maps(cfg, int(manifest["pp"]))), hf_dir
    cfg = read_hf_config(path)
    return cfg, HFSource(path, cfg), path


def _fingerprint(hf_dir: Path, weights: HFWeights) -> str:
    digest = hashlib.sha256((hf_dir / "config.json").read_bytes())
    for name in sorted(weights.names()):
        digest.update(f"{name}:{weights.shape(name)}".encode())
    return digest.hexdigest()


def _prepare_output(out: Path, same_as: dict | None) -> Path | None:
    """Refuse a non-empty output directory unless it already holds exactly this checkpoint.

    Returns None when the work is already done, else the temporary directory to write into.
    """
    if out.exists() and any(out.iterdir()):
        if same_as is not None and mf.is_megatron_checkpoint(out):
            have = mf.read_manifest(out)
            if all(have.get(k) == v for k, v in same_as.items()):
                return None
        raise CheckpointError(
            f"{out}: the output directory already holds other files or a different checkpoint; "
            "choose a new --out or delete it"
        )
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    fsync_dir(tmp)
    if out.exists():  # an empty directory the user created
        out.rmdir()
    os.replace(tmp, out)
    fsync_dir(out.parent)


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, *,
                           layer_spec: str = "local") -> Path:
    """Write a megatron_prism checkpoint (TP x PP shards) from a HF Qwen3-VL directory.

    ``layer_spec="te"`` stores the tensors under the Transformer Engine spec's names (for tools that
    read megatron TE-layout state dicts); either checkpoint loads into a model of either spec."""
    if layer_spec not in ("local", "te"):
        raise ValueError(f"layer_spec must be 'local' or 'te', got {layer_spec!r}")
    hf_dir, out = Path(hf_dir), Path(out_dir)
    cfg = read_hf_config(hf_dir)
    check_layout(cfg, tp, pp)
    source = HFSource(hf_dir, cfg)
    identity = {"tp": tp, "pp": pp, "source_fingerprint": _fingerprint(hf_dir, source.weights)}
    if layer_spec != "local":
        identity["layer_spec"] = layer_spec
    tmp = _prepare_output(out, identity)
    if tmp is None:
        return out
    try:
        maps = layout_maps(cfg, pp)
        num_layers = cfg.text_config.num_hidden_layers
        weight_map: dict[str, list[str]] = {}
        files: dict[str, dict] = {}
        for stage in range(pp):
            per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
            for m in maps:
                if place(m, num_layers, pp).pp_rank != stage:
                    continue
                ranks = [0] if m.split == "replicated" else range(tp)
                stored = spec_name(m.megatron, layer_spec)
                for r in ranks:
                    per_rank[r][stored] = source.shard(m, r, tp).contiguous().clone()
                weight_map[stored] = [mf.shard_file(r, stage) for r in ranks]
            for r in range(tp):
                name = mf.shard_file(r, stage)
                save_file(per_rank[r], str(tmp / name), metadata={"format": "pt"})
                files[name] = {"tp_rank": r, "pp_rank": stage, "bytes": (tmp / name).stat().st_size}
        (tmp / mf.HF_SUBDIR).mkdir()
        copy_non_weight_files(hf_dir, tmp / mf.HF_SUBDIR)
        manifest = {
            "format": mf.FORMAT,
            "version": mf.VERSION,
            "model_type": cfg.model_type,
            **identity,
            "num_layers": num_layers,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "files": files,
            "weight_map": weight_map,
        }
        (tmp / mf.MANIFEST).write_text(json.dumps(manifest, indent=1))
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a HF Qwen3-VL directory (safetensors + the original config/tokenizer files)."""
    src, out = Path(megatron_dir), Path(out_dir)
    manifest = mf.read_manifest(src)
    cfg = read_hf_config(src / mf.HF_SUBDIR)
    weights = mf.MegatronWeights(src, layout_maps(cfg, int(manifest["pp"])))
    tmp = _prepare_output(out, None)
    try:
        expected = {**expected_lm_shapes(cfg), **expected_vision_shapes(cfg)}
        tensors = {}
        for name, shape in expected.items():
            tensor = weights.hf_tensor(name)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{src}: {name} unshards to {list(tensor.shape)}, config.json implies {list(shape)}; "
                    "the checkpoint is inconsistent, convert it again"
                )
            tensors[name] = tensor
        write_hf_weights(tensors, tmp)
        copy_non_weight_files(src / mf.HF_SUBDIR, tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
