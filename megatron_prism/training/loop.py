"""What every stage's training loop shares: where it writes, how it starts or resumes, how it
checkpoints, and what it reports.

A stage writes under its own directory (``stage.output_dir``): ``checkpoints/step_N`` (see
``checkpoint.py``), ``metrics.jsonl`` and TensorBoard events, and ``result.json`` when it has
finished. A stage whose ``result.json`` exists is complete: running the pipeline again skips it
and hands its final checkpoint to the next stage. A stage with checkpoints but no result resumes
from the newest one: model, optimizer, scheduler, data position and every RNG come back, so the
continuation is the same computation as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_prism.config.schema import PrismConfig, StageConfig
from megatron_prism.data.loader import ShardedLoader
from megatron_prism.models.conversion.hf_io import copy_non_weight_files
from megatron_prism.parallel.devices import host_group
from megatron_prism.training import checkpoint as ckpt
from megatron_prism.training.metrics import MetricsLogger
from megatron_prism.training.runtime import PolicyRuntime

log = logging.getLogger(__name__)
RESULT = "result.json"


@dataclass
class StageContext:
    """What the pipeline hands a stage."""

    cfg: PrismConfig
    stage: StageConfig
    source: Path  # the weights this stage starts from (HF dir or megatron_prism checkpoint)
    data_root: Path
    metrics: MetricsLogger
    dp_rank: int = 0
    dp_size: int = 1
    # What earlier stages handed on besides their weights, by name (e.g. WARMUP's trained
    # discriminator for ALIGN): collected by the pipeline from ``result.metrics["artifacts"]``.
    artifacts: dict[str, str] = field(default_factory=dict)
    # ``prism run --resume-from``: the checkpoint this stage resumes from instead of its newest.
    resume_from: Path | None = None
    # The run-wide config; ``cfg`` is the stage's view of it (``PrismConfig.for_stage``). Held-out
    # evaluation samples with the run-wide ``rollout`` so every stage's before/after figures compare.
    run_cfg: PrismConfig | None = None
    # The held-out figures of ``source`` when the stage before ended on exactly these weights
    # (its "after" evaluation, with the same run-wide settings): the stage's "before" figures,
    # taken as they are instead of sampled again.
    source_heldout: dict[str, float] | None = None

    @property
    def heldout_cfg(self) -> PrismConfig:
        return self.run_cfg or self.cfg

    @property
    def out_dir(self) -> Path:
        return Path(self.stage.output_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def split_path(self, split: str) -> Path:
        return Path(self.stage.data_path) if self.stage.data_path else self.data_root / split


@dataclass
class StageResult:
    stage: str
    checkpoint: str | None  # the final weights (None for a stage that trains nothing)
    steps: int
    wall_seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def finished_result(ctx: StageContext) -> StageResult | None:
    path = ctx.out_dir / RESULT
    if not path.is_file():
        return None
    return StageResult(**json.loads(path.read_text()))


def write_result(ctx: StageContext, result: StageResult) -> None:
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.out_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=1, sort_keys=True))
    tmp.replace(ctx.out_dir / RESULT)


@dataclass
class TrainingState:
    runtime: PolicyRuntime
    loader: ShardedLoader
    step: int
    extra: dict[str, Any]


def start_or_resume(ctx: StageContext, items: list, *, total_steps: int, seed_offset: int = 0,
                    companion: Path | None = None) -> TrainingState:
    """Build the policy (from the stage's newest checkpoint that verifies, else from ``source``),
    its optimizer and the data loader, and restore their state on resume. ``companion``: another
    checkpoint directory of the stage whose same step must verify too (ALIGN's discriminator)."""
    cfg = ctx.cfg
    seed = cfg.run.seed + seed_offset
    optim = cfg.stage_section(ctx.stage.name, "optim")  # the run-wide optim with the stage's lr and keys
    latest = ckpt.choose_resume(ctx.checkpoint_root, resume_from=ctx.resume_from, companion=companion)
    loader = ShardedLoader(items, ctx.stage.global_batch_size, seed=cfg.data.seed + seed_offset,
                           dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
    if latest is None:
        ckpt.seed_every_rng(ckpt.stage_seed(seed, ctx.stage.name))
        runtime = PolicyRuntime.build(ctx.source, cfg.model, cfg.parallel, optim, total_steps=total_steps, seed=seed)
        return TrainingState(runtime, loader, 0, {})
    loaded = ckpt.load_checkpoint(latest)
    runtime = PolicyRuntime.build(latest, cfg.model, cfg.parallel, optim, total_steps=total_steps, seed=seed)
    # What the stage reads later (config, tokenizer, processor files) comes from the stage's stable
    # copy, never from ``latest``, which pruning deletes.
    runtime.source = stage_hf_files(ctx, runtime.source)
    runtime.optimizer.load_state_dict(loaded.rank_state["optimizer"], origin=str(loaded.rank_file))
    loader.load_state_dict(loaded.trainer_state["loader"])
    ckpt.set_rng_state(loaded.rank_state["rng"])
    log.info("%s: resumed from %s (step %d)", ctx.stage.name, latest, loaded.trainer_state["step"])
    print(f"[prism] stage {ctx.stage.name}: resumed from {latest} (step {loaded.trainer_state['step']})", flush=True)
    return TrainingState(runtime, loader, int(loaded.trainer_state["step"]), loaded.trainer_state.get("extra", {}))


def stage_hf_files(ctx: StageContext, source: Path) -> Path:
    """The config/tokenizer files every checkpoint of the stage carries, copied once into the
    stage directory. Copying them from the runtime's source instead breaks after a resume: the
    source is then a checkpoint of this stage, which ``keep_last`` pruning deletes."""
    stable = ctx.out_dir / "hf_files"
    if (not dist.is_initialized() or dist.get_rank() == 0) and not (stable / "config.json").is_file():
        tmp = ctx.out_dir / ".tmp-hf_files"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        copy_non_weight_files(Path(source), tmp)
        shutil.rmtree(stable, ignore_errors=True)
        tmp.rename(stable)
    return stable


def save(ctx: StageContext, state: TrainingState, *, keep_last: int = 2) -> Path:
    """Collective checkpoint of everything a resume needs."""
    trainer_state = {"stage": ctx.stage.name, "step": state.step, "loader": state.loader.state_dict(),
                     "extra": state.extra}
    return ckpt.save_checkpoint(
        ctx.checkpoint_root, state.step, chunks=state.runtime.chunks, hf_config=state.runtime.hf_config,
        hf_files_dir=stage_hf_files(ctx, state.runtime.source), optimizer_state=state.runtime.optimizer.state_dict(),
        trainer_state=trainer_state, keep_last=keep_last,
    )


class Throughput:
    """Tokens per second of the last step, split into generation and training time."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = self.marks.get(name, 0.0) + now - self._t
        self._t = now

    def scalars(self, tokens: int) -> dict[str, float]:
        total = sum(self.marks.values()) or 1e-9
        out = {f"time/{k}_s": v for k, v in self.marks.items()}
        out["throughput/tokens_per_s"] = tokens / total
        return out


_TIMING_PREFIXES = ("time/", "throughput/", "sync/")


def final_figures(last: dict[str, float]) -> dict[str, float]:
    """A step's figures without the timings, kept in the trainer state so that a stage resumed at
    its last step still reports them (timings differ run to run; they stay out of the checkpoint)."""
    return {k: v for k, v in last.items() if not k.startswith(_TIMING_PREFIXES)}


def healthy(state: TrainingState, loss: float | None = None) -> bool:
    """Collective: no skip streak, a finite loss, finite weights on every rank (a save now would
    not poison a resume)."""
    import math

    import torch

    ok = state.runtime.optimizer.skipped_in_a_row == 0 and (loss is None or math.isfinite(loss))
    ok = ok and all(bool(torch.isfinite(p).all()) for c in state.runtime.chunks for p in c.parameters())
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=host_group())  # collective (host, gloo): the health flag
    return bool(flag[0])


def checkpoint_or_stop(ctx: StageContext, state: TrainingState, steps: int, *, loss: float | None = None) -> None:
    """After a step: checkpoint when one is due (and the state is healthy: never during a skip
    streak or with a non-finite loss/weight), and on a preemption request (signal or stop file,
    see ``training.preemption``) make sure this step is saved, then exit with status 75."""
    from megatron_prism.training import preemption

    due = state.step % ctx.stage.save_every == 0 or state.step == steps
    saved = None
    if due or preemption.should_stop():
        if healthy(state, loss):
            saved = save(ctx, state)
        else:
            log.warning("%s step %d: not saved (skip streak or non-finite loss/weights)", ctx.stage.name, state.step)
    if preemption.should_stop():
        raise preemption.Preempted(ctx.stage.name, state.step,
                                   checkpoint=saved or ckpt.newest_complete(ctx.checkpoint_root))
