"""``prism run``: the stages of a config in pipeline order, each starting from the previous one's
final weights, then ``report.json`` / ``report.md``.

Running the same command again continues where it stopped: finished stages (``result.json``) are
skipped, an interrupted stage resumes from its newest checkpoint (see ``training.loop``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from megatron_prism.config.loader import dump_config
from megatron_prism.config.schema import PrismConfig
from megatron_prism.registry import Registry
from megatron_prism.training.loop import StageContext, StageResult, finished_result, write_result
from megatron_prism.training.metrics import MetricsLogger

log = logging.getLogger(__name__)

StageFn = Callable[[StageContext], StageResult]
STAGES: Registry[StageFn] = Registry("stage")


# Where each implemented stage lives, imported only when a run starts (the stage modules pull in
# megatron-core and the model code); ``run`` checks a config against these names before anything
# heavy is imported or any stage starts.
STAGE_FUNCTIONS = {
    "sft": "megatron_prism.stages.sft:run_sft",
    "warmup": "megatron_prism.stages.warmup:run_warmup",
    "align": "megatron_prism.stages.align:run_align",
    "rlvr": "megatron_prism.stages.rlvr:run_rlvr",
    "eval": "megatron_prism.stages.evaluate:run_eval_stage",
}


def _register_stages() -> None:
    import importlib

    for name, target in STAGE_FUNCTIONS.items():
        if name not in STAGES:
            module, attr = target.split(":")
            STAGES.register(name)(getattr(importlib.import_module(module), attr))


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def prepare_data(cfg: PrismConfig, run_dir: Path) -> Path:
    """``data.root``, or the synthetic task generated once into ``<run>/data``."""
    if cfg.data.root:
        root = Path(cfg.data.root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={root} is not a directory")
        return root
    from megatron_prism.data.synth import SynthSizes, generate_dataset

    root = run_dir / "data"
    if _rank0() and not (root / "manifest.json").is_file():
        # every demonstration fits the generator's budget (64, the tiny default's ALIGN budget;
        # data.synth_sizes may set max_response_tokens); the stages' own are checked below
        sizes = dict(item.split("=") for item in cfg.data.synth_sizes.split(","))
        generate_dataset(root, cfg.data.seed, SynthSizes(**{k: int(v) for k, v in sizes.items()}), overwrite=True,
                         budget_setting="data.synth_sizes max_response_tokens")
    _barrier()
    return root


#: Stages that set the policy's responses against a split's demonstrations, and that split.
GAME_SPLITS = {"warmup": "align", "align": "align"}


def check_demonstration_budgets(cfg: PrismConfig, data_root: Path) -> None:
    """Every demonstration WARMUP and ALIGN read fits the stage's ``rollout.max_new_tokens`` (end
    token included), else one line naming the records and by how much (:mod:`data.budget`), before
    any model is built. The ``rl-on-align-prompts`` control reads no demonstration."""
    from megatron_prism.data import chat
    from megatron_prism.data.budget import check_response_budget
    from megatron_prism.data.loader import load_split
    from megatron_prism.data.processing import load_tokenizer
    from megatron_prism.data.records import RecordError

    def demonstration(record) -> str | None:
        try:
            return chat.demonstration(record)
        except RecordError:  # a record without one: the stage skips or refuses it
            return None

    checks = [(s, GAME_SPLITS[s.name]) for s in cfg.enabled_stages() if s.name in GAME_SPLITS
              and not (s.name == "align" and cfg.align.policy_reward == "verifiable")]
    if not checks:
        return
    model_dir = Path(cfg.model.megatron_dir or cfg.model.hf_dir or data_root / "tokenizer")
    tokenizer = load_tokenizer(model_dir / "hf" if (model_dir / "hf").is_dir() else model_dir)  # a checkpoint's HF side
    seen: set[tuple[Path, int]] = set()
    for stage, split in checks:
        path = Path(stage.data_path) if stage.data_path else data_root / split
        budget = cfg.for_stage(stage.name).rollout.max_new_tokens
        if (path, budget) in seen:  # WARMUP and ALIGN on one split and budget: checked once
            continue
        seen.add((path, budget))
        records, _ = load_split(path, split, strict=False)  # bad records: the stage's own skip or error
        check_response_budget(((r.origin or r.id, chat.render_response(text)) for r in records
                               if (text := demonstration(r)) is not None),
                              lambda text: len(tokenizer.encode(text, add_special_tokens=False)), budget,
                              where=f"stage {stage.name} ({path})", setting=f"stages.{stage.name}.rollout.max_new_tokens")


def prepare_model(cfg: PrismConfig, run_dir: Path, data_root: Path) -> Path:
    """The weights the first stage starts from: a megatron_prism checkpoint, a HF directory, or a
    tiny random Qwen3-VL built once for the data's tokenizer."""
    if cfg.model.megatron_dir:
        return Path(cfg.model.megatron_dir)
    if cfg.model.hf_dir:
        return Path(cfg.model.hf_dir)
    from megatron_prism.models.qwen3vl.tiny import save_tiny_for_tokenizer

    path = run_dir / "tiny_model"
    if _rank0() and not path.is_dir():
        import shutil

        # Built aside and renamed into place: a run killed half-way through writing it (weights
        # without tokenizer files, a cut model.safetensors) leaves only the temporary directory,
        # which the rerun replaces.
        tmp = run_dir / "tiny_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny_for_tokenizer(tmp, data_root / "tokenizer", seed=cfg.run.seed)
        tmp.rename(path)
    _barrier()
    return path


def run(cfg: PrismConfig, *, resume_from: str | Path | None = None) -> Path:
    """Runs the enabled stages; returns the path of report.md. ``resume_from``: a stage checkpoint
    to resume that stage from (the stages before it must have finished).

    Rank 0 first takes the run directory's OS lock (``training.run_lock``): a second run on the
    same directory refuses in one line before touching anything."""
    from megatron_prism.training.run_lock import rank0_run_lock

    with rank0_run_lock(cfg.run.output_dir):
        return _run_locked(cfg, resume_from)


def _resume_stage(resume_from: str | Path | None) -> str | None:
    if resume_from is None:
        return None
    from megatron_prism.models.errors import CheckpointError
    from megatron_prism.training.checkpoint import TRAINER_STATE
    from megatron_prism.training.integrity import read_json

    path = Path(resume_from)
    if not path.is_dir():
        raise CheckpointError(f"--resume-from {path}: no such checkpoint directory")
    state = read_json(path / TRAINER_STATE)
    return state.get("stage") if isinstance(state, dict) else None


def _run_locked(cfg: PrismConfig, resume_from: str | Path | None) -> Path:
    from megatron_prism.parallel.state import init_parallel
    from megatron_prism.training.checkpoint import seed_every_rng, stage_seed
    from megatron_prism.training.optimizer import TrainingDiverged

    _register_stages()
    resume_stage = _resume_stage(resume_from)
    from megatron_prism.training import preemption

    preemption.install()  # SIGUSR1/SIGTERM (Slurm's warning before the time limit): checkpoint, exit 75
    p = cfg.parallel
    init_parallel(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, seed=cfg.run.seed)
    from megatron.core import parallel_state as ps

    run_dir = Path(cfg.run.output_dir)
    if _rank0():
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    data_root = prepare_data(cfg, run_dir)
    check_demonstration_budgets(cfg, data_root)
    source = prepare_model(cfg, run_dir, data_root)
    metrics = MetricsLogger.for_run(cfg, run_dir)
    results: list[StageResult] = []
    artifacts: dict[str, str] = {}  # named outputs a stage hands to later ones (WARMUP's discriminator)
    heldout: dict[str, dict[str, float]] = {}  # weights -> their held-out figures, from the stage that ended on them
    started = time.time()
    try:
        for stage in cfg.enabled_stages():
            if stage.output_dir is None:
                stage.output_dir = str(run_dir / stage.name)
            # the stage's view: its own optim/rollout/algorithm keys over the run-wide sections
            ctx = StageContext(cfg.for_stage(stage.name), stage, source, data_root, metrics, run_cfg=cfg,
                               dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                               artifacts=dict(artifacts), source_heldout=heldout.get(str(source)))
            result = finished_result(ctx)
            if stage.name == resume_stage:
                if result is not None:
                    from megatron_prism.models.errors import CheckpointError

                    raise CheckpointError(f"--resume-from {resume_from}: stage {stage.name} already finished "
                                          f"({ctx.out_dir / 'result.json'}); delete that file to redo the stage")
                ctx.resume_from = Path(resume_from)
                if _rank0():
                    from megatron_prism.training.checkpoint import set_aside_newer

                    for moved in set_aside_newer(ctx.resume_from):
                        print(f"[prism] --resume-from: newer checkpoint set aside as {moved}", flush=True)
                _barrier()
            if result is None:
                print(f"[prism] stage {stage.name}: starting from {source}", flush=True)
                # Every RNG from (run seed, stage): a fresh stage does not depend on what ran before it.
                seed_every_rng(stage_seed(cfg.run.seed, stage.name))
                try:
                    result = STAGES.get(stage.name)(ctx)
                except TrainingDiverged as exc:
                    from megatron_prism.training.checkpoint import newest_complete

                    good = newest_complete(ctx.checkpoint_root)
                    raise TrainingDiverged(f"stage {stage.name}: {exc}; newest healthy checkpoint: "
                                           f"{good or 'none (the stage saved none)'}") from None
                write_result(ctx, result)
            else:
                print(f"[prism] stage {stage.name}: already finished, skipped", flush=True)
            if result.checkpoint:
                source = Path(result.checkpoint)
                if result.metrics.get("eval_after"):
                    heldout[str(source)] = result.metrics["eval_after"]
            artifacts.update(result.metrics.get("artifacts", {}))
            results.append(result)
    finally:
        metrics.close()
    report = write_report(run_dir, cfg, results, time.time() - started)
    return report


def stage_throughput(run_dir: Path, stage: str) -> dict[str, float]:
    """Whole-stage figures from the per-step scalars in ``metrics.jsonl`` (the last record of a
    step wins, so steps redone after a resume count once): tokens/s over all steps and the share
    of each phase (rollout, train, ...) of the step time."""
    path = run_dir / "metrics.jsonl"
    steps: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("stage") == stage and "throughput/tokens_per_s" in rec:
                steps[rec["step"]] = rec
    phases: dict[str, float] = {}
    tokens = 0.0
    for rec in steps.values():
        times = {k[len("time/"):-2]: v for k, v in rec.items() if k.startswith("time/") and k.endswith("_s")}
        for k, v in times.items():
            phases[k] = phases.get(k, 0.0) + v
        tokens += rec["throughput/tokens_per_s"] * sum(times.values())
    total = sum(phases.values())
    if not total:
        return {}
    return {"tokens_per_s": tokens / total, **{f"{k}_share": v / total for k, v in phases.items()}}


def write_report(run_dir: Path, cfg: PrismConfig, results: list[StageResult], wall: float) -> Path:
    """report.json (everything) and report.md (a table a person reads)."""
    md = run_dir / "report.md"
    if not _rank0():
        return md
    throughput = {r.stage: stage_throughput(run_dir, r.stage) for r in results}
    data = {"config": str(run_dir / "config.yaml"), "wall_seconds_this_invocation": wall,
            "stages": [{**r.to_json(), "throughput": throughput[r.stage]} for r in results]}
    _write_atomic(run_dir / "report.json", json.dumps(data, indent=1, sort_keys=True))
    ro = cfg.rollout
    protocol = (f"mean over {ro.val_n} samples per item at temperature {ro.val_temperature:g}, pass@{ro.val_n} beside it"
                if ro.val_temperature > 0 and ro.val_n > 1 else "greedy decoding")
    lines = ["# PRISM run report", "", f"Run directory: `{run_dir}`", "",
             f"Held-out accuracy: the eval split, {protocol}.", "",
             "| stage | steps | wall s | accuracy before | after | pass@k after | format after | tokens/s | rollout share "
             "| skipped records |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in results:
        before, after = r.metrics.get("eval_before", {}), r.metrics.get("eval_after", {})
        pass_k = next((v for k, v in after.items() if k.startswith("eval/pass@")), None)
        tp = throughput[r.stage]
        speed = (f"{tp['tokens_per_s']:.0f}", f"{tp.get('rollout_share', 0.0):.2f}") if tp else ("-", "-")
        skipped = sum(r.metrics.get("skipped_records", {}).values())
        lines.append(f"| {r.stage} | {r.steps} | {r.wall_seconds:.0f} | {show(before.get('eval/accuracy'))} "
                     f"| {show(after.get('eval/accuracy'))} | {show(pass_k)} | {show(after.get('eval/format'))} "
                     f"| {speed[0]} | {speed[1]} | {skipped} |")
    lines += readout_table(results)
    lines += discriminator_table(results)
    lines += curves_section(run_dir)
    _write_atomic(md, "\n".join(lines) + "\n")
    return md


def _write_atomic(path: Path, text: str) -> None:
    """Written whole or not at all; a full disk is a CheckpointWriteError (exit 74), never a
    traceback or half a report."""
    from megatron_prism.training.checkpoint import CheckpointWriteError

    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{path} could not be written ({exc}); the stages' results are intact, "
                                   "rerun to write the report") from None


def curves_section(run_dir: Path) -> list[str]:
    """report.md's picture: the run's curves (plots.plot_run), drawn from metrics.jsonl and the
    report.json just written. A plot that cannot be drawn costs the picture, not the report."""
    from megatron_prism.plots import plot_run

    try:
        png = plot_run(run_dir)
    except Exception as exc:  # noqa: BLE001 - matplotlib or a font; logged, the tables stand
        log.warning("report.md without curves: %s: %s", type(exc).__name__, exc)
        return []
    if png is None:
        return []
    return ["", "Curves (`plots/curves.png`; `prism plot` overlays runs, `tensorboard --logdir` has every scalar):",
            "", f"![curves]({png.relative_to(run_dir)})"]


# (stage, before key, after key, prefix): WARMUP judges the fixed policy with the discriminator
# before/after training it; ALIGN judges the policy before/after the game with the discriminator
# it started from (the policy's side of the game).
_GAME_FIGURES = (("warmup", "heldout_before", "heldout_after", "heldout/"),
                 ("align", "game_before", "game_after", "game/"))


def _num(value) -> str:
    """A figure for the table; ``-`` when there is none (e.g. accuracy with no valid response)."""
    return "-" if value is None or value != value else f"{value:.3f}"


def _count(value) -> str:
    return "-" if value is None or value != value else str(int(value))


def readout_table(results: list[StageResult]) -> list[str]:
    """report.md rows of the mechanism readouts of each stage's held-out evaluation, before -> after:
    the slip rate (the answer is not what the response's own think reached) and the caption error
    rate (the caption is not a faithful one of the scene), over responses with all three parts."""
    rows = []
    for r in results:
        before, after = r.metrics.get("eval_before", {}), r.metrics.get("eval_after", {})
        if "eval/slip_rate" not in after:
            continue
        pair = lambda k, fmt=_num: f"{fmt(before.get(k))} -> {fmt(after.get(k))}"  # noqa: E731
        rows.append(f"| {r.stage} | {pair('eval/slip_rate')} | {pair('eval/caption_error_rate')} "
                    f"| {pair('eval/readout_responses', _count)} |")
    if not rows:
        return []
    return ["", "Mechanism readouts on the held-out split, before -> after each stage (responses with caption, think "
            "and answer; slip: the answer is not the think's result; caption error: not a faithful caption of the "
            "scene):", "", "| stage | slip rate | caption error rate | responses read |", "| --- | --- | --- | --- |",
            *rows]


def discriminator_table(results: list[StageResult]) -> list[str]:
    """report.md rows for the discriminator stages: held-out part accuracy (teacher scored above
    the policy), part-score gap, invalid-response rate and the game objective, before -> after."""
    rows = []
    for r in results:
        for stage, before_key, after_key, prefix in _GAME_FIGURES:
            before, after = r.metrics.get(before_key), r.metrics.get(after_key)
            if r.stage != stage or not before or not after:
                continue
            pair = lambda k: f"{_num(before.get(prefix + k))} -> {_num(after.get(prefix + k))}"  # noqa: E731
            rows.append(f"| {stage} | {pair('caption/acc')} | {pair('reasoning/acc')} | {pair('caption/gap')} "
                        f"| {pair('reasoning/gap')} | {pair('invalid_rate')} | {pair('objective')} |")
    if not rows:
        return []
    return ["", "Discriminator stages, on held-out alignment prompts (WARMUP: the discriminator before -> after "
            "training; ALIGN: the policy before -> after the game, judged by the discriminator ALIGN started from):", "",
            "| stage | caption acc | reasoning acc | caption gap | reasoning gap | invalid rate | game objective |",
            "| --- | --- | --- | --- | --- | --- | --- |", *rows]
