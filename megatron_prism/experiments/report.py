"""``experiment_report.json`` / ``.md`` from the runs' evaluation reports.

Each run (arm, seed) left an ``eval_report.json`` (``prism eval``: k samples per item, per-item
scores). Per benchmark and arm the report gives the accuracy as mean +- std over seeds, and for
each arm against ``baseline`` the paired comparison of :mod:`.stats` on the items every run of
both arms evaluated. The ``average`` row is the unweighted mean over benchmarks (as ``prism eval``
averages); its comparison has the bootstrap interval and the over-seeds t-test (an over-items
t-test has no single item set to run on there). The over-seeds test is the headline: the seeds are
the independent repetitions of training; the over-items test treats the trained runs as fixed, so
it says whether these runs differ on these items, not whether the method does.

Beside accuracy, each arm's mechanism readouts (:data:`READOUTS`), read from its runs'
``report.json``: the slip and caption-error rates after each stage on the held-out split, the
discriminator's held-out accuracy per part after WARMUP, and ALIGN's game objective under the
starting discriminator before and after, as mean +- std over seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_prism.experiments.stats import compare, mean_std, paired_bootstrap_ci, paired_t_test

BASELINE = "baseline"


@dataclass(frozen=True)
class RunRecord:
    """One finished run: its arm, seed index, directory and evaluation report."""

    arm: str
    seed: int
    run_dir: Path
    eval_report: Path


#: (label, stage, metrics key, figure) of the mechanism readouts, as a run's report.json holds them.
READOUTS: tuple[tuple[str, str, str, str], ...] = (
    ("slip rate after SFT", "sft", "eval_after", "eval/slip_rate"),
    ("slip rate after ALIGN", "align", "eval_after", "eval/slip_rate"),
    ("slip rate after RLVR", "rlvr", "eval_after", "eval/slip_rate"),
    ("caption error after SFT", "sft", "eval_after", "eval/caption_error_rate"),
    ("caption error after ALIGN", "align", "eval_after", "eval/caption_error_rate"),
    ("caption error after RLVR", "rlvr", "eval_after", "eval/caption_error_rate"),
    ("WARMUP disc. acc. caption", "warmup", "heldout_after", "heldout/caption/acc"),
    ("WARMUP disc. acc. reasoning", "warmup", "heldout_after", "heldout/reasoning/acc"),
    ("game objective before ALIGN", "align", "game_before", "game/objective"),
    ("game objective after ALIGN", "align", "game_after", "game/objective"),
)


def run_readouts(run_dir: Path) -> dict[str, float]:
    """The :data:`READOUTS` one run reported (those its stages have), by label."""
    path = run_dir / "report.json"
    try:
        stages = {s["stage"]: s.get("metrics", {}) for s in json.loads(path.read_text())["stages"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the run report {path}: {exc}; rerun that run (delete its eval_report.json)") from None
    out = {}
    for label, stage, section, key in READOUTS:
        value = stages.get(stage, {}).get(section, {}).get(key)
        if isinstance(value, (int, float)):
            out[label] = float(value)
    return out


def _load(run: RunRecord) -> dict[str, dict[str, Any]]:
    """benchmark -> {"accuracy", "pass_at", "items": {id: mean score over the k samples}}."""
    try:
        data = json.loads(run.eval_report.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the evaluation report {run.eval_report} of {run.arm} seed {run.seed}: {exc}; "
                         f"delete it to re-evaluate that run") from None
    out = {}
    for name, bench in data["benchmarks"].items():
        items = {it["id"]: float(np.mean(it["scores"])) for it in bench["items"]}
        out[name] = {"accuracy": bench["mean_accuracy"], "pass_at": bench["pass_at"], "items": items}
    return out


def _matrix(per_seed: list[dict[str, float]], ids: list[str]) -> np.ndarray:
    return np.array([[scores[i] for i in ids] for scores in per_seed], dtype=np.float64)


def build_report(runs: list[RunRecord], *, meta: dict[str, Any], n_boot: int = 10_000) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module doc); ``meta`` is copied in as is."""
    loaded = {(r.arm, r.seed): _load(r) for r in runs}
    arms = list(dict.fromkeys(r.arm for r in runs))
    seeds = sorted({r.seed for r in runs})
    benches = sorted({b for rep in loaded.values() for b in rep})
    for key, rep in loaded.items():
        missing = [b for b in benches if b not in rep]
        if missing:
            raise ValueError(f"run {key[0]} seed {key[1]} has no result for benchmark(s) {missing}")

    def seed_acc(arm: str, bench: str) -> list[float]:
        return [loaded[(arm, s)][bench]["accuracy"] for s in seeds]

    summary: dict[str, Any] = {}
    for arm in arms:
        row = {b: dict(zip(("mean", "std"), mean_std(seed_acc(arm, b)))) for b in benches}
        avg = [float(np.mean([loaded[(arm, s)][b]["accuracy"] for b in benches])) for s in seeds]
        row["average"] = dict(zip(("mean", "std"), mean_std(avg)))
        summary[arm] = row

    comparisons: dict[str, Any] = {}
    if BASELINE in arms:
        for arm in arms:
            if arm == BASELINE:
                continue
            row, diffs = {}, []
            for b in benches:
                per = {a: [loaded[(a, s)][b]["items"] for s in seeds] for a in (arm, BASELINE)}
                ids = sorted(set.intersection(*(set(d) for a in per for d in per[a])))
                if not ids:
                    raise ValueError(f"{arm} and {BASELINE} share no evaluated item on {b}")
                x, y = _matrix(per[arm], ids), _matrix(per[BASELINE], ids)
                row[b] = compare(x, y, n_boot=n_boot)
                diffs.append(x - y)
            per_seed = np.mean([d.mean(axis=1) for d in diffs], axis=0)
            lo, hi = paired_bootstrap_ci(diffs, n_boot=n_boot)
            row["average"] = {"mean_diff": float(per_seed.mean()), "ci95": [lo, hi], "n_seeds": len(seeds),
                              "n_items": int(sum(d.shape[1] for d in diffs)), "t_items": None,
                              "t_seeds": paired_t_test(per_seed).to_json() if len(seeds) > 1 else None}
            comparisons[arm] = row

    run_dirs = {(r.arm, r.seed): r.run_dir for r in runs}
    readouts: dict[str, dict[str, Any]] = {}
    for arm in arms:
        per_seed = [run_readouts(run_dirs[(arm, s)]) for s in seeds]
        labels = [label for label, *_ in READOUTS if all(label in got for got in per_seed)]
        readouts[arm] = {label: dict(zip(("mean", "std"), mean_std([got[label] for got in per_seed])))
                         for label in labels}

    runs_json = {arm: {str(s): {"dir": str(run_dirs[(arm, s)]),
                                "accuracy": {b: loaded[(arm, s)][b]["accuracy"] for b in benches},
                                "pass_at": {b: loaded[(arm, s)][b]["pass_at"] for b in benches}}
                       for s in seeds} for arm in arms}
    return {**meta, "arms": arms, "seeds": seeds, "benchmarks": benches, "summary": summary,
            "comparisons": comparisons, "readouts": readouts, "runs": runs_json,
            "baseline": BASELINE if BASELINE in arms else None}


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _p(test: dict | None) -> str:
    return "-" if not test or test["p_value"] != test["p_value"] else f"{test['p_value']:.3g}"


def render_markdown(report: dict[str, Any]) -> str:
    """A person's view of :func:`build_report`'s dict."""
    cols = [*report["benchmarks"], "average"]
    lines = ["# PRISM experiment report", "",
             f"Config `{report.get('config')}`, RL algorithm **{report.get('algorithm')}**, "
             f"{len(report['seeds'])} seed(s), k = {report.get('k')} sample(s) per item at temperature "
             f"{report.get('temperature')}.", "",
             "## Accuracy (%), mean ± std over seeds", "",
             "| arm | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for arm, row in report["summary"].items():
        lines.append(f"| {arm} | " + " | ".join(_pct(row[c]["mean"], row[c]["std"]) for c in cols) + " |")
    if report["comparisons"]:
        lines += ["", f"## Difference to `{report['baseline']}` (percentage points)", "",
                  "Δ paired over items and seeds, its 95% bootstrap interval (seeds and items resampled), and "
                  "**p over seeds**: the paired t-test of the per-seed differences, the headline test (seeds are "
                  "the repetitions of training). p over items (seed-averaged differences) is conditional on the "
                  "trained runs: it says whether these runs differ on these items, not whether the method does.", "",
                  "| arm | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
        for arm, row in report["comparisons"].items():
            cells = []
            for c in cols:
                r = row[c]
                lo, hi = r["ci95"]
                cells.append(f"{100 * r['mean_diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                             f"**p seeds {_p(r['t_seeds'])}**, p items {_p(r['t_items'])} (conditional)")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    else:
        lines += ["", "No `baseline` arm in this experiment: no paired comparisons."]
    readouts = report.get("readouts") or {}
    labels = [label for label, *_ in READOUTS if any(label in row for row in readouts.values())]
    if labels:
        lines += ["", "## Mechanism readouts (held-out split), mean ± std over seeds", "",
                  "Slip rate: the answer differs from the result of the response's own think; caption error: the "
                  "caption is not the scene's (both over responses with all three parts, in-run evaluation); "
                  "discriminator accuracy: teacher above policy on held-out prompts; game objective: under the "
                  "discriminator ALIGN started from. - : the arm has no such stage.", "",
                  "| readout | " + " | ".join(readouts) + " |", "| --- |" + " --- |" * len(readouts)]
        for label in labels:
            cells = [f"{row[label]['mean']:.3f} ± {row[label]['std']:.3f}" if label in row else "-"
                     for row in readouts.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "experiment_report.json", out / "experiment_report.md"
    js.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    md.write_text(render_markdown(report))
    return js, md
