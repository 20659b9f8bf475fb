"""The project's Megatron checkpoint format: per-rank safetensors + a manifest, reshardable.

Layout of a directory::

    prism_checkpoint.json            manifest: layout, dtype, weight_map, file sizes
    hf/                              config.json, tokenizer and processor files, kept verbatim
    mp_rank_{tp:02d}_{pp:03d}.safetensors

Tensors are stored under *global* megatron names (layer indices of the whole model) in the file
of the (TP rank, PP stage) that holds them; a replicated tensor is stored once, in the TP-rank-0
file of its stage. ``weight_map`` lists, per name, the files of its TP shards in rank order.
Names are the map's (the local layer spec's); a checkpoint whose ``weight_map`` holds Transformer
Engine spec names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``: manifest
``layer_spec: te``) is read through :func:`mapping.canonical_name`, so it loads and converts the
same. Because names are global and every split is described by :mod:`mapping`, a checkpoint written
at one TP/PP layout loads at any other (:class:`MegatronWeights` reshards on read, one tensor at
a time). safetensors holds tensors only: loading never unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megatron_prism.models.conversion.mapping import ParamMap, canonical_name
from megatron_prism.models.errors import CheckpointError

MANIFEST = "prism_checkpoint.json"
FORMAT = "megatron_prism/sharded-safetensors"
VERSION = 1
HF_SUBDIR = "hf"


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}.safetensors"


def gather_weight_map(written: dict[str, str]) -> dict[str, list[str]]:
    """Collective: every rank's ``{tensor name: shard file}`` merged into the manifest's weight
    map, each tensor's files in file-name order (= TP rank order: the order they concatenate in)."""
    import torch.distributed as dist

    gathered: list = [written]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, written)
    weight_map: dict[str, list[str]] = {}
    for part in gathered:
        for name, file in part.items():
            weight_map.setdefault(name, []).append(file)
    return {name: sorted(files) for name, files in weight_map.items()}


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path}: not found; {ckpt_dir} is not a megatron_prism checkpoint "
            "(convert one with tools/convert_hf_to_megatron.py)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt manifest ({exc}); re-run the conversion") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
            f"{FORMAT!r} v{VERSION}; convert the checkpoint again with this version"
        )
    return manifest


class MegatronWeights:
    """Reads a megatron_prism checkpoint as HF tensors or as shards of any TP size."""

    def __init__(self, ckpt_dir: str | Path, maps: list[ParamMap]) -> None:
        self.dir = Path(ckpt_dir)
        self.manifest = read_manifest(self.dir)
        self.tp = int(self.manifest["tp"])
        # keyed by the map's names; _stored_name gives the name the tensor has in its files
        self.weight_map: dict[str, list[str]] = {}
        self._stored_name: dict[str, str] = {}
        for stored, files in self.manifest["weight_map"].items():
            name = canonical_name(stored)
            if name in self.weight_map:
                raise CheckpointError(f"{self.dir / MANIFEST}: {stored!r} and {self._stored_name[name]!r} are the "
                                      "same parameter under two layer specs' names; the manifest is corrupt")
            self.weight_map[name], self._stored_name[name] = files, stored
        for file, info in self.manifest["files"].items():
            path = self.dir / file
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {MANIFEST} is missing; the checkpoint is incomplete")
            if path.stat().st_size != info["bytes"]:
                raise CheckpointError(
                    f"{path}: {path.stat().st_size} bytes, the manifest says {info['bytes']}; "
                    "the shard is truncated or was replaced, copy or convert it again"
                )
        self._handles: dict[str, object] = {}
        # Which stored megatron parameter provides each HF tensor (the tied output copy never does).
        self._provider: dict[str, ParamMap] = {}
        for m in maps:
            if m.megatron in self.weight_map:
                for name in m.hf:
                    self._provider.setdefault(name, m)
        self._unsharded: dict[str, list[torch.Tensor]] = {}

    def _read(self, file: str, name: str) -> torch.Tensor:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.dir / file), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{self.dir / file}: cannot read ({exc}); the shard is corrupt") from exc
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.dir / file}: cannot read {name!r} ({exc}); the shard is corrupt") from exc

    def stored_shards(self, megatron_name: str) -> list[torch.Tensor]:
        files = self.weight_map.get(megatron_name)
        if not files:
            raise CheckpointError(f"{self.dir}: parameter {megatron_name!r} is not in the checkpoint")
        return [self._read(f, self._stored_name[megatron_name]) for f in files]

    def hf_tensor(self, hf_name: str) -> torch.Tensor:
        """One HF tensor, unsharded from the stored shards."""
        m = self._provider.get(hf_name)
        if m is None:
            raise CheckpointError(f"{self.dir}: no stored parameter provides HF tensor {hf_name!r}")
        if m.megatron not in self._unsharded:
            self._unsharded = {m.megatron: m.unshard(self.stored_shards(m.megatron))}  # keep one
        return self._unsharded[m.megatron][m.hf.index(hf_name)]

    def shard(self, m: ParamMap, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The shard of ``m`` for a TP rank, resharding when the stored TP size differs."""
        if tp_size == self.tp and m.megatron in self.weight_map:
            files = self.weight_map[m.megatron]
            return self._read(files[tp_rank if len(files) > 1 else 0], self._stored_name[m.megatron])
        return m.shard([self.hf_tensor(n) for n in m.hf], tp_rank, tp_size)
