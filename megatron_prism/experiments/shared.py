"""Stages that several arms of an experiment run alike are run once: SFT (and WARMUP) per seed.

The arms of ``prism experiment`` mostly differ after SFT (``baseline``, ``prism`` and
``rl-on-align-prompts`` share it; ``prism`` and its discriminator ablations also share WARMUP
unless the discriminator differs). Every run of a shared stage would compute the same weights, so
the runner points the stage's ``output_dir`` at one directory per *prefix key* and the pipeline,
which skips a stage whose ``result.json`` exists and hands its checkpoint on, runs it once.

:func:`prefix_key` of stage S is a hash of everything that decides S's output: the model,
parallel and data sections, the run seed, and, for S and every enabled stage before it, the
stage's entry (minus ``output_dir``) and the ``optim`` / ``rollout`` / ``algorithm`` sections it
runs with (``PrismConfig.for_stage``); for WARMUP also the ``discriminator`` and ``align``
sections; and the names and sizes of the data files those stages read. Two arms get the same key
exactly when those agree, so an arm whose SFT differs (``align-data-as-sft`` trains on a merged
split) gets its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from megatron_prism.config import PrismConfig
from megatron_prism.config.schema import STAGE_ORDER, STAGE_SECTIONS

#: The stages an experiment shares between arms, in pipeline order (each key covers those before it).
SHARED_STAGES = ("sft", "warmup")
_SPLITS = {"sft": ("sft",), "warmup": ("align",)}


def _files(path: Path) -> list[tuple[str, int]]:
    """(relative name, size) of every file under ``path`` (a split directory or one file)."""
    if path.is_file():
        return [(path.name, path.stat().st_size)]
    if not path.is_dir():
        return []
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


def prefix_key(cfg: PrismConfig, stage: str, data_root: Path) -> str:
    """The sha256 of what decides ``stage``'s output in ``cfg`` (module docstring)."""
    if stage not in SHARED_STAGES:
        raise ValueError(f"only {', '.join(SHARED_STAGES)} are shared between arms, not {stage!r}")
    asdict = dataclasses.asdict
    parts: dict = {"model": asdict(cfg.model), "parallel": asdict(cfg.parallel), "data": asdict(cfg.data),
                   "seed": cfg.run.seed, "stages": {}}
    for name in STAGE_ORDER[:STAGE_ORDER.index(stage) + 1]:
        entry = cfg.stages.get(name)
        if entry is None or not entry.enabled:
            continue
        view = cfg.for_stage(name)
        parts["stages"][name] = {"entry": {k: v for k, v in asdict(entry).items() if k != "output_dir"},
                                 **{s: asdict(getattr(view, s)) for s in STAGE_SECTIONS}}
        splits = [Path(entry.data_path)] if entry.data_path else [data_root / s for s in _SPLITS[name]]
        parts["stages"][name]["files"] = [_files(p) for p in splits]
        if name == "warmup":
            parts["discriminator"], parts["align"] = asdict(cfg.discriminator), asdict(cfg.align)
    if any(cfg.stages[n].eval_every > 0 for n in parts["stages"]):
        parts["eval_files"] = _files(data_root / "eval")  # held-out figures the stage's result reports
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def shared_stage_overrides(cfg: PrismConfig, data_root: Path, shared_root: Path) -> list[str]:
    """``stages.<s>.output_dir=<shared_root>/<s>-<key>`` for each enabled shared stage of ``cfg``
    (none for a stage whose output directory the user set)."""
    out = []
    for name in SHARED_STAGES:
        entry = cfg.stages.get(name)
        if entry is None or not entry.enabled or entry.output_dir is not None:
            continue
        out.append(f"stages.{name}.output_dir={shared_root / f'{name}-{prefix_key(cfg, name, data_root)[:16]}'}")
    return out
