"""Reading and writing Hugging Face safetensors directories, with checks that name the file.

Tensors are read lazily (``safe_open``): a rank that builds one pipeline stage at TP rank r reads
only what it needs, and ``get_slice`` avoids materialising whole tensors where a slice will do.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_prism.models.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files that are not weights but belong to the model directory (kept through conversions).
NON_WEIGHT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".md", ".tiktoken")


class HFWeights:
    """Name -> tensor access over a HF model directory (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such directory; pass the Hugging Face model directory")
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc}); re-export the checkpoint") from exc
        elif (self.dir / SINGLE).is_file():
            weight_map = {name: SINGLE for name in self._keys_of(self.dir / SINGLE)}
        else:
            raise CheckpointError(
                f"{self.dir}: no {SINGLE} or {INDEX}; the directory must hold the safetensors weights"
            )
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}
        for file in sorted(set(weight_map.values())):
            if not (self.dir / file).is_file():
                raise CheckpointError(f"{self.dir / file}: listed in {INDEX} but missing; copy the shard")

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: cannot read safetensors ({exc}); the file is truncated or corrupt, copy it again"
            ) from exc

    @classmethod
    def _keys_of(cls, path: Path) -> list[str]:
        return list(cls._open(path).keys())

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._open(self.dir / file)
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        try:
            return self._handle(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{self.dir / file}: cannot read tensor {name!r} ({exc}); the file is truncated or corrupt"
            ) from exc


def check_hf_shapes(weights: HFWeights, expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present with the expected shape, and nothing unexpected."""
    missing = sorted(set(expected) - set(weights.names()))
    if missing:
        raise CheckpointError(
            f"{weights.dir}: {len(missing)} tensors the config needs are missing, e.g. {missing[:3]}; "
            "the weights do not belong to this config.json"
        )
    extra = sorted(set(weights.names()) - set(expected))
    if extra:
        raise CheckpointError(
            f"{weights.dir}: {len(extra)} tensors are not part of a Qwen3-VL model of this config, "
            f"e.g. {extra[:3]}; the weights do not belong to this config.json"
        )
    for name, shape in expected.items():
        got = weights.shape(name)
        if got != shape:
            raise CheckpointError(
                f"{weights.dir / weights.weight_map[name]}: {name} has shape {list(got)} but config.json "
                f"implies {list(shape)}; the weights and the config do not match"
            )


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and processor files (not weights, not the index) from src to dst."""
    copied = []
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and path.name != INDEX and path.suffix in NON_WEIGHT_SUFFIXES:
            shutil.copy2(path, Path(dst) / path.name)
            copied.append(path.name)
    return copied


def write_hf_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write tensors as HF safetensors: one file, or shards plus an index past max_shard_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives a crash."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
