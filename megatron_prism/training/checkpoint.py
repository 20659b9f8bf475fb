"""Training checkpoints: model, optimizer, LR schedule, data position, every RNG, stage and step.

A checkpoint is a directory ``<root>/step_<N>/``:

    prism_checkpoint.json, hf/, mp_rank_TT_PPP.safetensors   the model, in the project's megatron
                                                             format (loads at any TP/PP layout)
    rank_RRRRR.pt                                            per rank: optimizer + scheduler state,
                                                             RNG states (torch.load weights_only)
    trainer_state.json                                       stage, step, loader position, extras
    COMPLETE.json                                            every file above (hf/ too) with its
                                                             size and sha256, the step, the world size

Writing goes to ``<root>/.tmp-step_<N>/``, is hashed while written (``training.integrity``),
fsynced, and renamed into place only when every rank has finished; ``latest`` (a one-line file,
itself replaced atomically) names the newest but is only a hint: the ``step_*`` directories decide.
So a crash at any moment leaves either the previous checkpoint or the new one, never half of one. A
failed write (disk full, from any writer) removes its temporary directory, leaves the previous
checkpoint intact and raises :class:`CheckpointWriteError` saying so; temporaries left by a killed
write are removed at the next save. A save of NaN/inf weights is refused (:class:`NonFiniteCheckpoint`).
Loading re-hashes every file against ``COMPLETE.json``, checks the step and the layout, and refuses
(:class:`CheckpointError`, naming the file) rather than half-loading; :func:`newest_verified` picks
the newest checkpoint that verifies, passing over (in one line each) those that do not. The last
``keep_last`` checkpoints are kept.

The collectives of a save are marked ``# collective:`` (the ``ok`` flags and the digest gather).
"""

from __future__ import annotations

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

from megatron_prism.models.conversion import megatron_format as mf
from megatron_prism.models.conversion.convert import layout_maps
from megatron_prism.models.conversion.hf_io import copy_non_weight_files, fsync_dir
from megatron_prism.models.conversion.mapping import global_name
from megatron_prism.models.errors import CheckpointError
from megatron_prism.parallel.devices import host_group
from megatron_prism.training.faults import pause_point
from megatron_prism.training.integrity import (check_free_space, load_torch_verified, read_json, state_bytes,
                                                 tree_digests, verify_digest, write_json, write_safetensors,
                                                 write_torch)

LATEST = "latest"
COMPLETE = "COMPLETE.json"
TRAINER_STATE = "trainer_state.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


class NonFiniteCheckpoint(CheckpointWriteError):
    """A save refused because the weights hold NaN/inf (it would poison the resume)."""


@dataclass
class LoadedCheckpoint:
    path: Path
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any]

    @property
    def rank_file(self) -> Path:
        """The file ``rank_state`` was read from (for errors)."""
        return self.path / f"rank_{_rank():05d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=host_group())  # host (gloo): a slow rank-0 finalise must not hit NCCL's timeout


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


def stage_seed(run_seed: int, stage: str) -> int:
    """The seed of a stage: a function of (run seed, stage name) only."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{run_seed}:{stage}".encode()).digest()[:4], "little") % (2**31 - 1)


def seed_every_rng(seed: int) -> None:
    """python, numpy, torch (+CUDA) and megatron's model-parallel RNG tracker, from one seed, so a
    stage started fresh does the same whatever ran before it in the process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


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


def _all_finite(shard: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in shard.values() if t.is_floating_point())


def remove_stale_temporaries(root: Path) -> None:
    """``.tmp-step_*`` left behind by a write that was killed (rank 0, before a save)."""
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


# ok codes, MIN-reduced over the ranks: the worst one wins.
_OK, _WRITE_FAILED, _NON_FINITE = 1, 0, -1


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
    """Collective: every rank calls it. Returns the final checkpoint path.

    Refuses (:class:`NonFiniteCheckpoint`) to write weights with a NaN/inf; any write error
    (disk full from safetensors, torch.save, JSON) is a :class:`CheckpointWriteError` with the
    previous checkpoint intact and no temporary directory left."""
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    rank = _rank()
    ok = torch.tensor([_OK], dtype=torch.int32)
    error: BaseException | str = "another rank failed"
    digests: dict[str, dict[str, Any]] = {}
    written: dict[str, str] = {}
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(root)
            tmp.mkdir()
        _barrier()
        # Data-parallel replicas hold the same weights: only DP rank 0 writes them (two replicas
        # writing one file name would also list each tensor twice in the manifest).
        shard = _model_shard(chunks, hf_config) if ps.get_data_parallel_rank() == 0 else {}
        if not _all_finite(shard):
            ok[0] = _NON_FINITE
            raise _Refused()
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        shard_name = mf.shard_file(tp_rank, pp_rank)
        rank_file = f"rank_{rank:05d}.pt"
        rank_payload = {"optimizer": optimizer_state, "rng": rng_state()}
        check_free_space(tmp, state_bytes(shard) + state_bytes(rank_payload))
        if shard:
            digests[shard_name] = write_safetensors(tmp / shard_name, shard, {"format": "pt"}).to_json()
        digests[rank_file] = write_torch(tmp / rank_file, rank_payload).to_json()
        written = {n: shard_name for n in shard}
        pause_point("checkpoint.write")
    except _Refused:
        pass
    except Exception as exc:  # noqa: BLE001 - SafetensorError, torch's RuntimeError, OSError: all "not written"
        ok[0] = _WRITE_FAILED
        error = _one_line(exc)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=host_group())  # collective (host, gloo): the write phase's ok
    if ok[0] != _OK:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        previous = newest_complete(root)
        kept = (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
        if ok[0] == _NON_FINITE:
            raise NonFiniteCheckpoint(f"checkpoint at step {step} not written: the weights hold NaN/inf; {kept}")
        raise CheckpointWriteError(f"checkpoint at step {step} could not be written to {tmp} ({error}); {kept}")
    weight_map = mf.gather_weight_map(written)
    all_digests = _gather_digests(digests)  # collective: every rank's file digests
    if rank == 0:
        try:
            cfg = _unwrap(chunks[0]).config
            (tmp / mf.HF_SUBDIR).mkdir()
            copy_non_weight_files(Path(hf_files_dir), tmp / mf.HF_SUBDIR)
            manifest = {
                "format": mf.FORMAT, "version": mf.VERSION, "model_type": hf_config.model_type,
                "tp": cfg.tensor_model_parallel_size, "pp": cfg.pipeline_model_parallel_size,
                "num_layers": cfg.num_layers, "tie_word_embeddings": bool(hf_config.tie_word_embeddings),
                "files": {n: {"bytes": d["bytes"]} for n, d in all_digests.items() if n.startswith("mp_rank_")},
                "weight_map": weight_map, "source_fingerprint": f"training step {step}",
            }
            all_digests[mf.MANIFEST] = write_json(tmp / mf.MANIFEST, manifest).to_json()
            all_digests[TRAINER_STATE] = write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step}).to_json()
            all_digests.update({n: d.to_json() for n, d in tree_digests(tmp, mf.HF_SUBDIR).items()})
            commit(root, tmp, step, all_digests, keep_last=keep_last)
        except Exception as exc:  # noqa: BLE001 - as above: the previous checkpoint stays the newest
            shutil.rmtree(tmp, ignore_errors=True)
            ok[0] = _WRITE_FAILED
            error = _one_line(exc)
    if dist.is_initialized():
        dist.broadcast(ok, src=0, group=host_group())  # collective (host, gloo): rank 0's finalisation ok
    _barrier()
    if ok[0] != _OK:
        raise CheckpointWriteError(f"checkpoint at step {step} could not be finalised ({error}); "
                                   f"the previous checkpoint {newest_complete(root)} is intact")
    return final


class _Refused(Exception):
    pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _gather_digests(local: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    gathered: list = [local]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local, group=host_group())  # collective (host, gloo)
    return {name: d for part in gathered for name, d in part.items()}


def commit(root: Path, tmp: Path, step: int, digests: dict[str, dict[str, Any]], *, keep_last: int) -> Path:
    """Rank 0, after every rank's files are in ``tmp``: COMPLETE.json (the digests), fsync, the
    rename into place, ``latest``, pruning. Shared by the policy and the discriminator saves."""
    final = root / f"step_{step:08d}"
    complete = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "files": digests}
    write_json(tmp / COMPLETE, complete)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)  # the same step written again after a resume
    tmp.rename(final)
    _point_latest(root, final)
    _prune(root, keep_last)
    return final


def _point_latest(root: Path, target: Path) -> None:
    """``latest`` names ``target`` (written to a temporary name, then renamed over)."""
    _write_fsync(root / (LATEST + ".tmp"), lambda p: p.write_text(target.name + "\n"))
    (root / (LATEST + ".tmp")).replace(root / LATEST)
    fsync_dir(root)


def _prune(root: Path, keep_last: int) -> None:
    """Keeps the newest ``keep_last``. Every kept checkpoint is healthy: a save refuses NaN/inf
    weights and the stage loops do not save during a skip streak."""
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _step_dirs(root: Path) -> list[Path]:
    """``step_*`` directories, newest first (``latest`` is only a hint: the directories decide)."""
    out = []
    for p in root.glob("step_*"):
        try:
            out.append((int(p.name[len("step_"):]), p))
        except ValueError:
            continue
    return [p for _, p in sorted(out, reverse=True) if p.is_dir()]


def newest_complete(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` with a COMPLETE.json (not verified; None when none).
    ``latest`` naming a directory that is gone is ignored, never a trap."""
    root = Path(root)
    return next((p for p in _step_dirs(root) if (p / COMPLETE).is_file()), None) if root.is_dir() else None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None when there is none yet)."""
    return newest_complete(root)


def _verify_with(path: Path, world: int, companion: Path | None) -> None:
    """``path`` verifies, and so does the same step under ``companion`` (ALIGN's discriminator
    checkpoints, saved at the policy's steps: a resume needs both halves of a step)."""
    verify_checkpoint(path, world)
    if companion is not None:
        verify_checkpoint(Path(companion) / path.name, world)


def newest_verified(root: str | Path, world_size: int | None = None, *, say=print,
                    companion: str | Path | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (digests, JSON, step, layout; and the
    same step under ``companion`` when given); each one that does not is reported in one line
    (``say``) and passed over. None when ``root`` holds no checkpoint; a CheckpointError when it
    holds some and none verifies."""
    root = Path(root)
    world = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    candidates = _step_dirs(root) if root.is_dir() else []
    reasons = []
    for path in candidates:
        try:
            _verify_with(path, world, Path(companion) if companion is not None else None)
            return path
        except CheckpointError as exc:
            reasons.append(str(exc))
            say(f"[prism] checkpoint {path.name} does not verify, passed over: {exc}", flush=True)
    if candidates:
        raise CheckpointError(f"{root}: none of the {len(candidates)} checkpoints verifies (newest: {reasons[0]}); "
                              f"delete {root} to start the stage over, or pick one with --resume-from")
    return None


def choose_resume(root: str | Path, *, resume_from: str | Path | None = None,
                  companion: str | Path | None = None) -> Path | None:
    """Collective: the checkpoint every rank resumes from (``resume_from`` when given, verified;
    else :func:`newest_verified`), decided on rank 0 (which hashes the files) and broadcast.
    ``companion``: a directory whose checkpoint of the same step must verify too."""
    choice: list = [None]
    companion = Path(companion) if companion is not None else None
    if _rank() == 0:
        try:
            if resume_from is not None:
                _verify_with(Path(resume_from), dist.get_world_size() if dist.is_initialized() else 1, companion)
                choice[0] = ("ok", str(resume_from))
            else:
                found = newest_verified(root, companion=companion)
                choice[0] = ("ok", str(found) if found else None)
            if choice[0][1] is not None:
                # a kill between a save's rename and its ``latest`` update (or a garbled newer one
                # passed over) leaves ``latest`` naming another checkpoint: it names the one resumed
                # from, also when the stage then has nothing left to save
                _point_latest(Path(choice[0][1]).parent, Path(choice[0][1]))
        except CheckpointError as exc:
            choice[0] = ("error", str(exc))
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0, group=host_group())  # collective (host, gloo): the resume choice
    kind, value = choice[0]
    if kind == "error":
        raise CheckpointError(value)
    return Path(value) if value else None


def set_aside_newer(path: str | Path) -> list[Path]:
    """``--resume-from`` an older checkpoint: the newer ``step_*`` of the same stage are renamed
    ``discarded-step_*`` (kept for the operator, never resumed from), so a later preemption does
    not resume from the abandoned line. Rank 0; returns the renamed directories."""
    path = Path(path)
    step = int(path.name[len("step_"):])
    moved = []
    for newer in _step_dirs(path.parent):
        if int(newer.name[len("step_"):]) > step:
            target = newer.with_name("discarded-" + newer.name)
            shutil.rmtree(target, ignore_errors=True)
            newer.rename(target)
            moved.append(target)
    return moved


def verify_checkpoint(path: Path, world_size: int) -> dict[str, Any]:
    """Checks COMPLETE.json (sizes and sha256 of every file, the step, the layout) against the
    directory; returns the trainer state."""
    path = Path(path)
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {COMPLETE}; the checkpoint is incomplete and will not be loaded")
    complete = read_json(marker)
    if not isinstance(complete, dict) or not isinstance(complete.get("files"), dict):
        raise CheckpointError(f"{marker}: no file list; the checkpoint is damaged")
    for name, expected in complete["files"].items():
        verify_digest(path / name, expected)
    if complete.get("world_size") != world_size:
        raise CheckpointError(f"{path}: written by {complete.get('world_size')} ranks, this job has {world_size}; "
                              "resume with the same layout (the model weights alone load at any layout)")
    trainer_state = read_json(path / TRAINER_STATE)
    named = path.name[len("step_"):] if path.name.startswith("step_") else None
    steps = {complete.get("step"), trainer_state.get("step") if isinstance(trainer_state, dict) else None}
    if len(steps) != 1 or (named is not None and named.isdigit() and int(named) not in steps):
        raise CheckpointError(f"{path / TRAINER_STATE}: step {trainer_state.get('step')} disagrees with "
                              f"{COMPLETE} (step {complete.get('step')}) or the directory name; the checkpoint "
                              "is damaged or was edited")
    return trainer_state


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Reads this rank's state (the model weights are loaded by build_policy from ``path``)."""
    path = Path(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer_state = verify_checkpoint(path, world)
    name = f"rank_{_rank():05d}.pt"
    expected = read_json(path / COMPLETE)["files"].get(name)
    rank_state = load_torch_verified(path / name, expected)
    return LoadedCheckpoint(path, trainer_state, rank_state)
