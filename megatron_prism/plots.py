"""Curves to look at: a run's training curves as one PNG, and ``prism plot`` overlays of runs and
experiment arms (the mean over seeds with a band from the lowest to the highest seed).

Everything is read from what a run already writes: ``metrics.jsonl`` (one line per stage step; a
step logged again after a resume replaces the earlier line) and ``report.json`` (held-out
accuracy before and after each stage). The panels:

* SFT loss; RLVR reward and accuracy; the ALIGN game's objective and invalid-response rate;
* the discriminator's accuracy per part (caption = perception, think + answer = reasoning) in
  WARMUP (training pairs) and ALIGN (the policy's fresh responses);
* KL to the rollout policy, token entropy, response length and clip fraction of ALIGN and RLVR;
* held-out accuracy across the pipeline: before the first stage and after each stage.

A panel with no data (a stage that did not run) is left out. ``prism plot A B`` takes run
directories and experiment directories (``<exp>/<arm>/seed<k>/``); each run is one line, each arm
one line (the mean over its seeds) with its band.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CURVES = "curves.png"
PLOTS_DIR = "plots"

#: (title, y label, [(stage, metric key, line label)])
PANELS: tuple[tuple[str, str, tuple[tuple[str, str, str], ...]], ...] = (
    ("SFT loss", "NLL per response token", (("sft", "loss", "sft"),)),
    ("RLVR reward and accuracy", "mean over samples", (("rlvr", "reward/mean", "reward"),
                                                       ("rlvr", "reward/accuracy", "accuracy"))),
    ("ALIGN game", "per response", (("align", "disc/objective", "objective"),
                                    ("align", "disc/invalid_rate", "invalid rate"))),
    ("Discriminator accuracy per part", "teacher scored above policy", (
        ("warmup", "disc/train_caption_acc", "warmup caption"), ("warmup", "disc/train_reasoning_acc",
                                                                 "warmup reasoning"),
        ("align", "disc/caption/acc", "align caption"), ("align", "disc/reasoning/acc", "align reasoning"))),
    ("KL to the rollout policy", "approx. KL per token", (("align", "approx_kl", "align"),
                                                          ("rlvr", "approx_kl", "rlvr"))),
    ("Entropy", "nats per token", (("align", "entropy", "align"), ("rlvr", "entropy", "rlvr"))),
    ("Response length", "tokens", (("align", "response/length", "align"), ("rlvr", "response/length", "rlvr"))),
    ("Clip fraction", "share of tokens clipped", (("align", "clip_frac", "align"), ("rlvr", "clip_frac", "rlvr"))),
)
HELD_OUT = "Held-out accuracy across the pipeline"


class PlotError(ValueError):
    """An argument of ``prism plot`` that is not a run or experiment directory."""


@dataclass
class Run:
    """One run's curves: ``metrics[(stage, key)] = {step: value}`` and the held-out accuracy
    points ``[(label, accuracy)]`` (before the first stage, after each stage)."""

    name: str
    path: Path
    metrics: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    held_out: list[tuple[str, float]] = field(default_factory=list)


def read_run(path: str | Path, name: str | None = None) -> Run:
    """A run directory's curves (metrics.jsonl, report.json when the run finished)."""
    path = Path(path)
    jsonl = path / "metrics.jsonl"
    if not jsonl.is_file():
        raise PlotError(f"{path}: no metrics.jsonl; give a prism run's output directory (run.output_dir) or an "
                        "experiment directory")
    run = Run(name or path.resolve().name, path)
    for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: the rest of the file is still good
        stage, step = rec.get("stage"), rec.get("step")
        if not isinstance(stage, str) or not isinstance(step, int):
            continue
        for key, value in rec.items():
            if key not in ("stage", "step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                run.metrics.setdefault((stage, key), {})[step] = float(value)
    run.held_out = _held_out(path)
    return run


def _held_out(path: Path) -> list[tuple[str, float]]:
    report = path / "report.json"
    if not report.is_file():
        return []
    try:
        stages = json.loads(report.read_text(encoding="utf-8")).get("stages", [])
    except json.JSONDecodeError:
        return []
    points: list[tuple[str, float]] = []
    for stage in stages:
        metrics = stage.get("metrics", {})
        before = metrics.get("eval_before", {}).get("eval/accuracy")
        after = metrics.get("eval_after", {}).get("eval/accuracy")
        if before is not None and not points:
            points.append(("start", float(before)))
        if after is not None:
            points.append((stage["stage"], float(after)))
    return points


def find_runs(path: str | Path) -> dict[str, list[Run]]:
    """``{label: [runs]}``: a run directory is one label; an experiment directory gives one label
    per arm with its seeds' runs."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        run = read_run(path)
        return {run.name: [run]}
    if not path.is_dir():
        raise PlotError(f"{path}: no such directory")
    arms: dict[str, list[Run]] = {}
    for arm in sorted(p for p in path.iterdir() if p.is_dir()):
        seeds = sorted(s for s in arm.iterdir() if s.is_dir() and (s / "metrics.jsonl").is_file())
        if seeds:
            arms[arm.name] = [read_run(s, f"{arm.name}/{s.name}") for s in seeds]
    if not arms:
        raise PlotError(f"{path}: neither a run directory (metrics.jsonl) nor an experiment directory "
                        "(<arm>/seed<k>/metrics.jsonl)")
    return arms


@dataclass
class Line:
    label: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None  # band (lowest seed), when the line is a mean over seeds
    high: list[float] | None = None


def _mean_line(label: str, series: Sequence[dict[int, float]]) -> Line | None:
    """The mean over seeds at the steps every seed has, with a min..max band (one seed: no band)."""
    series = [s for s in series if s]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    values = [[s[t] for s in series] for t in steps]
    mean = [sum(v) / len(v) for v in values]
    if len(series) == 1:
        return Line(label, [float(t) for t in steps], mean)
    return Line(label, [float(t) for t in steps], mean, [min(v) for v in values], [max(v) for v in values])


def panel_lines(groups: dict[str, list[Run]], specs: Iterable[tuple[str, str, str]]) -> list[Line]:
    """The lines of one panel: per group (run or arm) and per (stage, key) spec with data."""
    lines = []
    for group, runs in groups.items():
        for stage, key, label in specs:
            line = _mean_line(label if len(groups) == 1 else f"{group} {label}",
                              [r.metrics.get((stage, key), {}) for r in runs])
            if line is not None:
                lines.append(line)
    return lines


def held_out_lines(groups: dict[str, list[Run]]) -> tuple[list[str], list[Line]]:
    """The held-out accuracy points of every group on one categorical axis (stage labels)."""
    from megatron_prism.config.schema import STAGE_ORDER

    seen = {label for runs in groups.values() for run in runs for label, _ in run.held_out}
    # pipeline order, whatever arm shows a stage first (the baseline has no ALIGN)
    rank = {label: i for i, label in enumerate(("start", *STAGE_ORDER))}
    order = sorted(seen, key=lambda label: (rank.get(label, len(rank)), label))
    lines = []
    for group, runs in groups.items():
        line = _mean_line(group if len(groups) > 1 else "held-out accuracy",
                          [{order.index(lab): acc for lab, acc in r.held_out} for r in runs])
        if line is not None:
            lines.append(line)
    return order, lines


def plot_curves(groups: dict[str, list[Run]], out: str | Path, *, title: str | None = None) -> Path | None:
    """Draws every panel with data into one PNG; returns its path (None when nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (login nodes, CI)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(t, yl, lines) for t, yl, specs in PANELS if (lines := panel_lines(groups, specs))]
    order, held = held_out_lines(groups)
    if held:
        panels.append((HELD_OUT, "accuracy", held))
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, ylabel, lines) in zip(axes.flat, panels):
        for line in lines:
            style = {"marker": "o", "markersize": 3} if len(line.x) <= 30 else {}
            (drawn,) = ax.plot(line.x, line.y, label=line.label, linewidth=1.3, **style)
            if line.low is not None:
                ax.fill_between(line.x, line.low, line.high, color=drawn.get_color(), alpha=0.2, linewidth=0)
        if name == HELD_OUT:
            ax.set_xticks(range(len(order)), order)
            ax.set_xlabel("after stage")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_run(run_dir: str | Path) -> Path | None:
    """``<run>/plots/curves.png`` from the run's own files (None when it logged nothing)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    return plot_curves({run.name: [run]}, run_dir / PLOTS_DIR / CURVES, title=f"prism run {run.name}")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``prism plot``."""
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_EXPERIMENT",
                        help="run directories (run.output_dir) and/or experiment directories (<arm>/seed<k>/)")
    parser.add_argument("--out", default="prism_curves.png", help="the PNG to write (default prism_curves.png)")
    parser.add_argument("--title", default=None)
    return parser


def run_plot(args: argparse.Namespace) -> int:
    """``prism plot``: exit 0 with the PNG's path, or 2 with one line on stderr."""
    groups: dict[str, list[Run]] = {}
    try:
        for path in args.paths:
            for label, runs in find_runs(path).items():
                key, n = label, 2
                while key in groups:  # the same run name in two places: keep both, apart
                    key, n = f"{label} ({n})", n + 1
                groups[key] = runs
    except PlotError as exc:
        print(f"prism: error: {exc}", file=sys.stderr)
        return 2
    out = plot_curves(groups, args.out, title=args.title)
    if out is None:
        print(f"prism: error: nothing to plot: {', '.join(args.paths)} logged no curve of {', '.join(t for t, _, _ in PANELS)}",
              file=sys.stderr)
        return 2
    seeds = ", ".join(f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})" for label, runs in groups.items())
    print(f"[plot] {seeds} -> {out}")
    return 0
