"""Discriminator checkpoints: the project's Megatron format plus a ``discriminator`` manifest block.

Same layout as a policy checkpoint (``prism_checkpoint.json``, ``hf/``, per-rank safetensors under
global names, reshardable to any TP/PP; see :mod:`...conversion.megatron_format`), with experts
stored under global expert indices (files of EP rank r > 0 carry an ``_ep{r}`` suffix) and::

    "discriminator": {"spec": {...DiscriminatorSpec...},
                      "initialised": ["score_head.weight", routers...] or [],
                      "origin": "upcycled from DIR, seed S" | "saved from a trained model"}

``initialised`` records which tensors were drawn at random (upcycling from a plain backbone) rather
than trained. A directory without the block is not a discriminator: loading it is an error, never a
model with a silently random head (PRISM's loader prints a warning and goes on with one).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from megatron_prism.models.conversion import megatron_format as mf
from megatron_prism.models.conversion.convert import _commit, _prepare_output
from megatron_prism.models.conversion.hf_io import copy_non_weight_files
from megatron_prism.models.discriminator.manifest import BLOCK, is_discriminator_checkpoint
from megatron_prism.models.discriminator.mapping import HEAD, discriminator_maps, expert_index
from megatron_prism.models.discriminator.spec import DiscriminatorSpec
from megatron_prism.models.discriminator.upcycle import UpcycleSource, backbone_source
from megatron_prism.models.errors import CheckpointError
from megatron_prism.models.qwen3vl.config import read_hf_config

def open_discriminator(path: str | Path):
    """(hf_config, spec, weight source, hf-files dir, metadata) of a discriminator checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such discriminator checkpoint; write one with "
                              "tools/upcycle_discriminator.py or point at a saved discriminator")
    if not mf.is_megatron_checkpoint(path):
        raise CheckpointError(f"{path}: not a megatron_prism checkpoint (no {mf.MANIFEST}); a discriminator is "
                              "made from a backbone with tools/upcycle_discriminator.py")
    manifest = mf.read_manifest(path)
    if BLOCK not in manifest:
        raise CheckpointError(f"{path}: a plain Qwen3-VL checkpoint without a score head, not a discriminator; "
                              "upcycle it with tools/upcycle_discriminator.py --hf-dir " + str(path))
    meta = manifest[BLOCK]
    spec = DiscriminatorSpec.from_dict(meta["spec"])
    cfg = read_hf_config(path / mf.HF_SUBDIR)
    maps = discriminator_maps(cfg, spec)
    missing = [m.megatron for m in maps if m.megatron not in manifest["weight_map"]]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} discriminator tensors are missing, e.g. {missing[:3]}; "
                              "the checkpoint is incomplete or of another mode, write it again")
    return cfg, spec, mf.MegatronWeights(path, maps), path / mf.HF_SUBDIR, meta


def upcycle_to_checkpoint(backbone: str | Path, out: str | Path, spec: DiscriminatorSpec, *,
                          seed: int = 0, expert_noise: float = 0.0) -> Path:
    """Write a discriminator checkpoint (TP=1, PP=1 files; loads at any layout) from a backbone."""
    backbone, out = Path(backbone), Path(out)
    cfg, dense, hf_dir = backbone_source(backbone)
    source = UpcycleSource(dense, cfg, spec, seed=seed, expert_noise=expert_noise)
    maps = discriminator_maps(cfg, spec)
    tmp = _prepare_output(out, None)
    try:
        tensors = {m.megatron: source.shard(m, 0, 1).contiguous().clone() for m in maps}
        name = mf.shard_file(0, 0)
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        initialised = [m.megatron for m in maps if m.megatron == HEAD or m.megatron.endswith(".router.weight")]
        meta = {"spec": spec.to_dict(), "initialised": initialised,
                "origin": f"upcycled from {backbone}, seed {seed}, expert noise {expert_noise}"}
        _write_manifest(tmp, cfg, hf_dir, tp=1, pp=1, files=[name],
                        weight_map={n: [name] for n in tensors}, meta=meta, fingerprint=f"upcycled {backbone}")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_manifest(tmp: Path, cfg, hf_dir: Path, *, tp: int, pp: int, files: list[str],
                    weight_map: dict[str, list[str]], meta: dict[str, Any], fingerprint: str) -> None:
    (tmp / mf.HF_SUBDIR).mkdir()
    copy_non_weight_files(Path(hf_dir), tmp / mf.HF_SUBDIR)
    manifest = {
        "format": mf.FORMAT, "version": mf.VERSION, "model_type": cfg.model_type, "tp": tp, "pp": pp,
        "num_layers": cfg.text_config.num_hidden_layers, "tie_word_embeddings": False,
        "files": {f: {"bytes": (tmp / f).stat().st_size} for f in sorted(set(files))},
        "weight_map": {n: sorted(fs) for n, fs in weight_map.items()},
        "source_fingerprint": fingerprint, BLOCK: meta,
    }
    (tmp / mf.MANIFEST).write_text(json.dumps(manifest, indent=1))


def save_discriminator(chunks: list, out: str | Path, *,
                       write_shard: Callable[[Path, dict[str, torch.Tensor], dict[str, str]], Any] | None = None) -> Path:
    """Collective (every rank calls it): this job's discriminator as a checkpoint at ``out``.

    Each tensor is written once: replicated ones by TP rank 0, dense ones by data-parallel rank 0,
    experts by expert-data-parallel rank 0 of the EP rank that holds them. ``write_shard(path,
    tensors, metadata)`` writes this rank's weight file (default: safetensors' ``save_file``); a
    training checkpoint passes one that hashes while it writes, so the weights are not read back.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_prism.models.discriminator.model import Qwen3VLDiscriminator

    models = [getattr(c, "module", c) for c in chunks]
    first: Qwen3VLDiscriminator = models[0]
    out = Path(out)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = None
    if rank == 0:
        tmp = _prepare_output(out, None)
    tmp_list = [str(tmp) if tmp else None]
    if dist.is_initialized():
        dist.broadcast_object_list(tmp_list, src=0)
    tmp = Path(tmp_list[0])
    tp_rank, pp_rank, ep_rank = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                 ps.get_expert_model_parallel_rank())
    splits = {m.megatron: m.split for m in discriminator_maps(first.hf_config, first.spec)}
    shard: dict[str, torch.Tensor] = {}
    for vp_stage, model in enumerate(models):
        for gname, param in model.global_named_parameters(vp_stage):
            is_expert = expert_index(gname) is not None
            dp_rank = ps.get_expert_data_parallel_rank() if is_expert else ps.get_data_parallel_rank()
            if gname not in splits or dp_rank != 0 or (splits[gname] == "replicated" and tp_rank != 0):
                continue
            shard[gname] = param.detach().to("cpu", copy=True).contiguous()
    name = mf.shard_file(tp_rank, pp_rank) if ep_rank == 0 else mf.shard_file(tp_rank, pp_rank).replace(
        ".safetensors", f"_ep{ep_rank:03d}.safetensors")
    if shard:
        if write_shard is None:
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        else:
            write_shard(tmp / name, shard, {"format": "pt"})
    written = {n: name for n in shard}
    weight_map = mf.gather_weight_map(written)
    if rank == 0:
        try:
            cfg = first.config
            meta = {"spec": first.spec.to_dict(), "initialised": [], "origin": "saved from a trained model"}
            _write_manifest(tmp, first.hf_config, first.hf_files_dir, tp=cfg.tensor_model_parallel_size,
                            pp=cfg.pipeline_model_parallel_size, files=sorted({f for fs in weight_map.values() for f in fs}),
                            weight_map=weight_map, meta=meta, fingerprint="saved discriminator")
            _commit(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if dist.is_initialized():
        dist.barrier()
    return out
