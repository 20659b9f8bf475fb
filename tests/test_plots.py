"""Curves as pictures: a run's PNG from metrics.jsonl / report.json, and `prism plot` overlays of runs
and experiment arms (the mean over seeds with a lowest..highest band)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
from PIL import Image

from megatron_prism.plots import PlotError, find_runs, held_out_lines, panel_lines, plot_run, read_run, run_plot


def _run(folder: Path, rows: list[dict], held_out: list[tuple[str, float, float | None]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"time": 0.0, **r}) + "\n" for r in rows))
    if held_out is not None:
        stages = [{"stage": name, "metrics": {"eval_before": {"eval/accuracy": before} if before is not None else {},
                                              "eval_after": {"eval/accuracy": after}}}
                  for name, after, before in held_out]
        (folder / "report.json").write_text(json.dumps({"stages": stages}))
    return folder


def _rlvr(seed_offset: float) -> list[dict]:
    return [{"stage": "rlvr", "step": s, "reward/mean": 0.1 * s + seed_offset, "reward/accuracy": 0.05 * s,
             "entropy": 1.0, "clip_frac": 0.01} for s in (1, 2, 3)]


def test_a_resumed_step_counts_once_and_a_cut_line_is_skipped(tmp_path):
    run = _run(tmp_path / "r", [{"stage": "sft", "step": 1, "loss": 3.0}, {"stage": "sft", "step": 2, "loss": 2.5},
                                {"stage": "sft", "step": 2, "loss": 2.4}])  # step 2 redone after a resume
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": "sft", "step": 3, "lo')  # a kill mid-write
    curves = read_run(run)
    assert curves.metrics[("sft", "loss")] == {1: 3.0, 2: 2.4}
    (line,) = panel_lines({"r": [curves]}, [("sft", "loss", "sft")])
    assert (line.x, line.y, line.low) == ([1.0, 2.0], [3.0, 2.4], None)


def test_arms_are_the_mean_over_seeds_with_a_min_max_band(tmp_path):
    exp = tmp_path / "exp"
    _run(exp / "baseline" / "seed0", _rlvr(0.0), [("sft", 0.2, 0.1), ("rlvr", 0.4, None)])
    _run(exp / "baseline" / "seed1", _rlvr(0.2), [("sft", 0.3, 0.1), ("rlvr", 0.6, None)])
    _run(exp / "prism" / "seed0", _rlvr(0.5)[:2], [("sft", 0.2, 0.1), ("align", 0.3, None), ("rlvr", 0.7, None)])
    (exp / "data").mkdir()  # the experiment's shared data folder is not an arm
    groups = find_runs(exp)
    assert {k: [r.name for r in v] for k, v in groups.items()} == {"baseline": ["baseline/seed0", "baseline/seed1"],
                                                                   "prism": ["prism/seed0"]}
    base, prism = panel_lines(groups, [("rlvr", "reward/mean", "reward")])
    assert base.label == "baseline reward" and base.x == [1.0, 2.0, 3.0]
    assert base.y == pytest.approx([0.2, 0.3, 0.4]) and base.low == pytest.approx([0.1, 0.2, 0.3])
    assert base.high == pytest.approx([0.3, 0.4, 0.5])
    assert prism.y == pytest.approx([0.6, 0.7]) and prism.low is None  # one seed: no band
    order, (h_base, h_prism) = held_out_lines(groups)
    assert order == ["start", "sft", "align", "rlvr"]  # pipeline order, though the first arm has no ALIGN
    assert h_base.y == pytest.approx([0.1, 0.25, 0.5]) and h_base.high == pytest.approx([0.1, 0.3, 0.6])
    assert h_base.x == [0.0, 1.0, 3.0] and h_prism.x == [0.0, 1.0, 2.0, 3.0]


def test_a_run_writes_its_png_and_prism_plot_overlays_runs_and_arms(tmp_path, capsys):
    run = _run(tmp_path / "run-a", [*_rlvr(0.0), {"stage": "sft", "step": 1, "loss": 2.0},
                                    {"stage": "warmup", "step": 1, "disc/train_caption_acc": 0.6,
                                     "disc/train_reasoning_acc": 0.7}], [("sft", 0.2, 0.1)])
    png = plot_run(run)
    assert png == run / "plots" / "curves.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 500 and img.height > 500
    exp = tmp_path / "exp"
    _run(exp / "prism" / "seed0", _rlvr(0.1))
    _run(exp / "prism" / "seed1", _rlvr(0.3))
    out = tmp_path / "both.png"
    assert run_plot(Namespace(paths=[str(run), str(exp)], out=str(out), title="t")) == 0
    assert out.is_file() and f"-> {out}" in capsys.readouterr().out
    assert run_plot(Namespace(paths=[str(tmp_path / "nope")], out=str(out), title=None)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: no such directory" in err
    empty = _run(tmp_path / "empty", [{"stage": "sft", "step": 1, "rows": 3}])
    assert run_plot(Namespace(paths=[str(empty)], out=str(out), title=None)) == 2
    assert "nothing to plot" in capsys.readouterr().err
    with pytest.raises(PlotError, match="neither a run directory"):
        find_runs(tmp_path / "exp" / "prism" / "seed0" / "..")  # a folder of seeds, not of arms
