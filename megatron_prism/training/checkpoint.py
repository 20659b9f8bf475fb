"""Training checkpoints: model, optimizer, LR schedule, data position, every RNG, stage and step.

A checkpoint is a directory ``<root>/step_<N>/``:

    prism_checkpoint.json, hf/, mp_rank_TT_PPP.safetensors   the model, in the project's megatron
                                                             format (loads at any TP/PP layout)
    rank_RRRRR.pt                                            per rank: optimizer + scheduler state,
                                                             RNG states (torch.load weights_only)
    trainer_state.json                                       stage, step, loader position, extras
    COMPLETE.json                                            every file above with its size

Writing goes to ``<root>/.tmp-step_<N>/``, is fsynced, and is renamed into place only when every
rank has finished; ``latest`` (a one-line file, itself replaced atomically) names the newest. So a
crash at any moment leaves either the previous checkpoint or the new one, never half of one. A
failed write (disk full) removes its temporary directory, leaves the previous checkpoint intact and
raises :class:`CheckpointWriteError` saying so. Loading checks ``COMPLETE.json`` against the files
on disk and the layout against the running job, and refuses (:class:`CheckpointError`) rather than
half-loading. The last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from safetensors.torch import save_file

from megatron_prism.models.conversion import megatron_format as mf
from megatron_prism.models.conversion.convert import layout_maps
from megatron_prism.models.conversion.hf_io import copy_non_weight_files, fsync_dir
from megatron_prism.models.conversion.mapping import global_name
from megatron_prism.models.errors import CheckpointError
from megatron_prism.parallel.devices import host_group
from megatron_prism.training.faults import pause_point

LATEST = "latest"
COMPLETE = "COMPLETE.json"
TRAINER_STATE = "trainer_state.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


@dataclass
class LoadedCheckpoint:
    path: Path
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


# --- RNG -------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every RNG a step consumes, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- model shards ----------------------------------------------------------------------------

def _model_shard(chunks, hf_config) -> dict[str, torch.Tensor]:
    """This rank's parameters under global names; replicated ones only on TP rank 0."""
    cfg = _unwrap(chunks[0]).config
    pp, vpp = cfg.pipeline_model_parallel_size, cfg.virtual_pipeline_model_parallel_size
    splits = {m.megatron: m.split for m in layout_maps(hf_config, pp)}
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    out: dict[str, torch.Tensor] = {}
    for vp_stage, chunk in enumerate(chunks):
        for name, param in _unwrap(chunk).named_parameters():
            gname = global_name(name, pp_rank, vp_stage, cfg.num_layers, pp, vpp)
            if gname not in splits:
                continue  # e.g. the tied output copy at PP=1 that the format does not store
            if splits[gname] == "replicated" and tp_rank != 0:
                continue
            out[gname] = param.detach().to("cpu", copy=True).contiguous()
    return out


def _write_fsync(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    chunks: list,
    hf_config,
    hf_files_dir: str | Path,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    rank = _rank()
    ok = torch.tensor([1], dtype=torch.int32)
    error: BaseException | str = "another rank failed"
    written: dict[str, str] = {}
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed write
            tmp.mkdir()
        _barrier()
        # Data-parallel replicas hold the same weights: only DP rank 0 writes them (two replicas
        # writing one file name would also list each tensor twice in the manifest).
        shard = _model_shard(chunks, hf_config) if ps.get_data_parallel_rank() == 0 else {}
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        shard_name = mf.shard_file(tp_rank, pp_rank)
        if shard:
            _write_fsync(tmp / shard_name, lambda p: save_file(shard, str(p), metadata={"format": "pt"}))
        rank_file = f"rank_{rank:05d}.pt"
        _write_fsync(tmp / rank_file, lambda p: torch.save({"optimizer": optimizer_state, "rng": rng_state()}, p))
        written = {n: shard_name for n in shard}
        pause_point("checkpoint.write")
    except OSError as exc:
        ok[0] = 0
        error = exc
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=host_group())  # a host vote: gloo
    if not ok[0]:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        previous = latest_checkpoint(root)
        raise CheckpointWriteError(
            f"checkpoint at step {step} could not be written to {tmp} "
            f"({error}); "
            f"{'the previous checkpoint ' + str(previous) + ' is intact' if previous else 'no earlier checkpoint exists'}"
        )
    weight_map = mf.gather_weight_map(written)
    if rank == 0:
        try:
            cfg = _unwrap(chunks[0]).config
            (tmp / mf.HF_SUBDIR).mkdir()
            copy_non_weight_files(Path(hf_files_dir), tmp / mf.HF_SUBDIR)
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            manifest = {
                "format": mf.FORMAT, "version": mf.VERSION, "model_type": hf_config.model_type,
                "tp": cfg.tensor_model_parallel_size, "pp": cfg.pipeline_model_parallel_size,
                "num_layers": cfg.num_layers, "tie_word_embeddings": bool(hf_config.tie_word_embeddings),
                "files": {n: {"bytes": s} for n, s in files.items() if n.startswith("mp_rank_")},
                "weight_map": weight_map, "source_fingerprint": f"training step {step}",
            }
            _write_fsync(tmp / mf.MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
            _write_fsync(tmp / TRAINER_STATE, lambda p: p.write_text(json.dumps(trainer_state, indent=1, sort_keys=True)))
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            complete = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                        "files": files}
            _write_fsync(tmp / COMPLETE, lambda p: p.write_text(json.dumps(complete, indent=1, sort_keys=True)))
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)  # the same step written again after a resume
            tmp.rename(final)
            _write_fsync(root / (LATEST + ".tmp"), lambda p: p.write_text(final.name + "\n"))
            (root / (LATEST + ".tmp")).replace(root / LATEST)
            fsync_dir(root)
            _prune(root, keep_last)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            ok[0] = 0
            error = exc
    if dist.is_initialized():
        dist.broadcast(ok, src=0, group=host_group())
    _barrier()
    if not ok[0]:
        raise CheckpointWriteError(f"checkpoint at step {step} could not be finalised ({error}); "
                                   f"the previous checkpoint {latest_checkpoint(root)} is intact")
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None when there is none yet)."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist; remove {pointer} to start over "
                              "or point it at an existing step_* directory")
    return path


def verify_checkpoint(path: Path, world_size: int) -> dict[str, Any]:
    """Checks COMPLETE.json against the directory; returns the trainer state."""
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {COMPLETE}; the checkpoint is incomplete and will not be loaded")
    complete = json.loads(marker.read_text())
    for name, size in complete["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            got = f.stat().st_size if f.is_file() else "missing"
            raise CheckpointError(f"{path}: {name} is {got} bytes, expected {size}; the checkpoint is truncated "
                                  "or damaged and will not be loaded (delete it to resume from an earlier one)")
    if complete["world_size"] != world_size:
        raise CheckpointError(f"{path}: written by {complete['world_size']} ranks, this job has {world_size}; "
                              "resume with the same layout (the model weights alone load at any layout)")
    return json.loads((path / TRAINER_STATE).read_text())


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Reads this rank's state (the model weights are loaded by build_policy from ``path``)."""
    path = Path(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer_state = verify_checkpoint(path, world)
    rank_state = torch.load(path / f"rank_{_rank():05d}.pt", weights_only=True)
    return LoadedCheckpoint(path, trainer_state, rank_state)
