"""``prism experiment``: every (arm, seed) as a ``prism run`` into ``<out>/<arm>/seed<k>``, a k-sample
``prism eval`` of its final weights, then ``experiment_report.json`` / ``.md``.

Each run is a subprocess (the launcher, e.g. ``torchrun --nproc-per-node 8``, in front), so the
same command drives laptop and cluster runs. Runs are resumable: a run directory records the exact
overrides it was started with (``experiment_run.json``); a run whose ``eval_report.json`` exists is
reused, an unfinished one is re-launched and ``prism run`` continues from its last checkpoint. A
run directory started with different overrides is an error, never silently mixed in.

All runs share one data root (the config's ``data.root``, or the synthetic task generated once into
``<out>/data``), so every arm and seed is evaluated on the same items, which the paired tests need.
Seed k sets ``run.seed = <config run.seed> + k`` in every arm (seeds are paired across arms).
Override order, later winning: the user's ``key=value``, the arm's, the algorithm's, the runner's
own (``run.output_dir``, ``run.seed``, ``data.root``, ``stages.sft.data_path`` for merged splits,
and ``stages.sft.output_dir`` / ``stages.warmup.output_dir``). Arms that run SFT (and WARMUP) alike
at a seed share one run of it under ``<out>/shared/<stage>-<key>`` (:mod:`.shared`): the first arm
trains it, the others find it finished and start from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_prism.config import PrismConfig, load_config
from megatron_prism.console import format_duration
from megatron_prism.experiments.arms import ALGORITHMS, Arm
from megatron_prism.experiments.report import RunRecord, build_report, write_report
from megatron_prism.experiments.shared import shared_stage_overrides

MARKER = "experiment_run.json"
EVAL_REPORT = "eval_report.json"


class ExperimentError(RuntimeError):
    """A run failed or a run directory conflicts; the message names the run and its log."""


@dataclass
class ExperimentSpec:
    config: Path
    arms: list[Arm]
    seeds: int
    algorithm: str = "grpo"
    out: Path | None = None  # None: <run.output_dir>/experiment
    overrides: list[str] = field(default_factory=list)
    k: int = 1
    temperature: float = 0.0
    benchmarks: dict[str, str] = field(default_factory=dict)
    launcher: str = ""  # "" = this Python; else e.g. "torchrun --nproc-per-node 8"
    timeout: float | None = None  # seconds per subprocess
    jobs: int = 1  # runs at once (a run waits for the one that trains the SFT/WARMUP it shares: run_plan)


def check_stages_exist(arms: list[Arm]) -> None:
    """Fails before anything runs when an arm names a stage the pipeline does not have."""
    from megatron_prism.pipeline import STAGES, _register_stages

    _register_stages()
    for arm in arms:
        missing = [s for s in arm.stages if s not in STAGES]
        if missing:
            raise ValueError(f"arm {arm.name!r} needs the stage(s) {', '.join(missing)}, which the pipeline does not have "
                             f"(stages: {', '.join(STAGES.names())})")


def merge_splits(root: Path, splits: tuple[str, ...], dest: Path) -> Path:
    """One directory holding the records of ``root/<split>`` for every split (written once).

    JSONL records are rewritten with absolute image paths (record image paths are relative to
    their file) and ids prefixed ``<split>/`` for all but the first split; Parquet files (images
    embedded) are linked. Returns ``dest``."""
    done = dest / ".complete"
    if done.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for n, split in enumerate(splits):
        files = sorted(p for p in (root / split).glob("*") if p.suffix in (".jsonl", ".parquet"))
        if not files:
            raise FileNotFoundError(f"no .jsonl or .parquet records in {root / split} (split {split!r} of data.root)")
        for f in files:
            target = dest / f"{split}__{f.name}"
            if f.suffix == ".parquet":
                target.unlink(missing_ok=True)
                target.symlink_to(f.resolve())
                continue
            with f.open(encoding="utf-8") as src, target.open("w", encoding="utf-8") as out:
                for line in src:
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    if isinstance(obj.get("images"), list):
                        obj["images"] = [str((f.parent / i).resolve()) if isinstance(i, str) else i
                                         for i in obj["images"]]
                    if n and "id" in obj:
                        obj["id"] = f"{split}/{obj['id']}"
                    out.write(json.dumps(obj) + "\n")
    done.write_text("")
    return dest


def _command(spec: ExperimentSpec) -> list[str]:
    if not spec.launcher:
        return [sys.executable, "-m", "megatron_prism.cli"]
    return [*shlex.split(spec.launcher), "-m", "megatron_prism.cli"]


def _threads_per_job(jobs: int) -> str | None:
    """CPU threads for each of ``jobs`` runs at once: the machine's cores shared out, unless the
    user set OMP_NUM_THREADS (then theirs, for every run)."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return str(max(1, (os.cpu_count() or 1) // jobs))


def _launch(argv: list[str], log: Path, what: str, timeout: float | None, threads: str | None = None) -> None:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = threads
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {shlex.join(argv)}\n")
        out.flush()
        try:
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise ExperimentError(f"{what} failed ({rc}); full log {log}; last lines:\n{tail}")


def final_checkpoint(run_dir: Path) -> str:
    """The last checkpoint a finished ``prism run`` produced (from its report.json)."""
    report = run_dir / "report.json"
    if not report.is_file():
        raise ExperimentError(f"{run_dir} has no report.json: its prism run did not finish")
    ckpts = [s["checkpoint"] for s in json.loads(report.read_text())["stages"] if s.get("checkpoint")]
    if not ckpts:
        raise ExperimentError(f"{report} lists no checkpoint: the run trained nothing to evaluate")
    return ckpts[-1]


def run_overrides(spec: ExperimentSpec, cfg: PrismConfig, arm: Arm, seed: int, out: Path, data_root: Path
                  ) -> tuple[list[str], list[str]]:
    """(the ``key=value`` overrides of one arm at one seed, the shared stage directories among them)."""
    run_dir = out / arm.name / f"seed{seed}"
    overrides = [*spec.overrides, *arm.overrides, *ALGORITHMS[spec.algorithm],
                 f"run.output_dir={run_dir}", f"run.seed={cfg.run.seed + seed}", f"data.root={data_root}"]
    if arm.sft_splits != ("sft",):
        merged = merge_splits(data_root, arm.sft_splits, out / "merged_splits" / "+".join(arm.sft_splits))
        overrides.append(f"stages.sft.data_path={merged}")
    # SFT (and WARMUP) run once per seed for every arm that runs them alike (experiments.shared)
    shared = shared_stage_overrides(load_config(spec.config, overrides), data_root, out / "shared")
    return overrides + shared, [line.split("=", 1)[1] for line in shared]


def run_one(spec: ExperimentSpec, cfg: PrismConfig, arm: Arm, seed: int, out: Path, data_root: Path, *,
            position: str = "", overrides: list[str] | None = None) -> RunRecord:
    """Runs (or reuses) one arm at one seed; returns where its evaluation report is. ``position``
    (``"3/6"``) prefixes its progress lines; ``overrides``: :func:`run_overrides`' (computed here
    when not given)."""
    run_dir = out / arm.name / f"seed{seed}"
    if overrides is None:
        overrides, _ = run_overrides(spec, cfg, arm, seed, out, data_root)
    record = {"arm": arm.name, "seed": seed, "algorithm": spec.algorithm, "config": str(spec.config),
              "overrides": overrides, "k": spec.k, "temperature": spec.temperature, "benchmarks": spec.benchmarks}
    marker = run_dir / MARKER
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous != record:
            changed = sorted(k for k in record if previous.get(k) != record[k])
            raise ExperimentError(f"{run_dir} holds a run started with different settings ({', '.join(changed)}); "
                                  f"use another --out or delete that directory")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record, indent=1) + "\n")
    result = RunRecord(arm.name, seed, run_dir, run_dir / EVAL_REPORT)
    head = f"[experiment] {position + ' ' if position else ''}{arm.name} seed {seed}"
    if result.eval_report.is_file():
        print(f"{head}: finished earlier, reused ({run_dir})", flush=True)
        return result
    cmd = _command(spec)
    started = time.perf_counter()
    print(f"{head}: prism run -> {run_dir} (log {run_dir / 'prism_run.log'})", flush=True)
    threads = _threads_per_job(spec.jobs)
    _launch([*cmd, "run", str(spec.config), *overrides], run_dir / "prism_run.log", f"prism run of {arm.name} seed "
            f"{seed}", spec.timeout, threads)
    print(f"{head}: prism eval (log {run_dir / 'prism_eval.log'})", flush=True)
    bench = [a for name, path in spec.benchmarks.items() for a in ("--benchmark", f"{name}={path}")]
    _launch([*cmd, "eval", str(spec.config), *overrides, "--checkpoint", final_checkpoint(run_dir),
             "--split", str(data_root / "eval"), "--k", str(spec.k), "--temperature", str(spec.temperature),
             "--out", str(result.eval_report), *bench], run_dir / "prism_eval.log",
            f"prism eval of {arm.name} seed {seed}", spec.timeout, threads)
    accuracy = json.loads(result.eval_report.read_text()).get("average", {}).get("mean_accuracy")
    shown = f", mean accuracy {100 * accuracy:.2f}%" if isinstance(accuracy, (int, float)) else ""
    print(f"{head}: done in {format_duration(time.perf_counter() - started)}{shown}", flush=True)
    return result


def run_plan(spec: ExperimentSpec, order: list[tuple[Arm, int]], run, shared_dirs) -> dict[tuple[str, int], RunRecord]:
    """Runs every (arm, seed) of ``order`` with ``run(arm, seed)``, ``spec.jobs`` at a time.

    A run that reuses a shared stage (``shared_dirs(arm, seed)``: its shared SFT/WARMUP directories)
    waits until the first run in ``order`` with that directory, which trains it, has finished; any
    other run may start at once (``align-data-as-sft`` trains its own SFT beside a seed's baseline).
    The first failure stops new starts and is raised once the runs under way end."""
    import threading

    producer: dict[str, tuple[str, int]] = {}
    needs: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for arm, seed in order:
        dirs = shared_dirs(arm, seed)
        needs[(arm.name, seed)] = {producer[d] for d in dirs if d in producer}
        for d in dirs:
            producer.setdefault(d, (arm.name, seed))
    pending = list(order)
    finished: dict[tuple[str, int], RunRecord] = {}
    failures: list[BaseException] = []
    cond = threading.Condition()

    def next_task() -> tuple[Arm, int] | None:
        with cond:
            while pending and not failures:
                ready = next((t for t in pending if needs[(t[0].name, t[1])] <= finished.keys()), None)
                if ready is not None:
                    pending.remove(ready)
                    return ready
                cond.wait()
            return None

    def worker() -> None:
        while (task := next_task()) is not None:
            try:
                record = run(*task)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                with cond:
                    failures.append(exc)
                    cond.notify_all()
                return
            with cond:
                finished[(task[0].name, task[1])] = record
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, spec.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return finished


def run_experiment(spec: ExperimentSpec) -> tuple[Path, Path]:
    """Runs every (arm, seed) and writes the report; returns (json, md) paths."""
    if spec.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {spec.seeds}")
    if spec.algorithm not in ALGORITHMS:
        raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {spec.algorithm!r}")
    cfg = load_config(spec.config, spec.overrides)  # a bad key fails here, before any run
    check_stages_exist(spec.arms)
    out = Path(spec.out or Path(cfg.run.output_dir) / "experiment")
    from megatron_prism.pipeline import prepare_data

    data_root = prepare_data(cfg, out).resolve()
    if spec.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {spec.jobs}")
    for arm in spec.arms:  # written once, before runs go at once
        if arm.sft_splits != ("sft",):
            merge_splits(data_root, arm.sft_splits, out / "merged_splits" / "+".join(arm.sft_splits))
    plan = [(arm, seed) for arm in spec.arms for seed in range(spec.seeds)]
    position = {(arm.name, seed): f"{i}/{len(plan)}" for i, (arm, seed) in enumerate(plan, start=1)}
    # once per run: the shared stages' keys hash the data files
    prepared = {(arm.name, seed): run_overrides(spec, cfg, arm, seed, out, data_root) for arm, seed in plan}
    done = run_plan(spec, [(arm, seed) for seed in range(spec.seeds) for arm in spec.arms],
                    lambda arm, seed: run_one(spec, cfg, arm, seed, out, data_root, position=position[(arm.name, seed)],
                                              overrides=prepared[(arm.name, seed)][0]),
                    lambda arm, seed: prepared[(arm.name, seed)][1])
    runs = [done[(arm.name, seed)] for arm, seed in plan]
    meta = {"config": str(spec.config), "algorithm": spec.algorithm, "k": spec.k, "temperature": spec.temperature,
            "overrides": spec.overrides, "data_root": str(data_root),
            "arm_descriptions": {a.name: a.description for a in spec.arms}}
    return write_report(build_report(runs, meta=meta), out)
