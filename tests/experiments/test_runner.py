"""``prism experiment``: arms, the merged SFT split of the align-data-as-sft control, the report on
constructed runs (hand-computed figures), the issue-7 error for game arms, and a real two-seed
baseline experiment of very short ``prism run``s that is then resumed without re-running."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from megatron_prism.experiments import (
    ARMS,
    ExperimentError,
    ExperimentSpec,
    build_report,
    parse_arms,
    render_markdown,
    run_experiment,
)
from megatron_prism.experiments.report import RunRecord
from megatron_prism.experiments.runner import check_stages_exist, merge_splits, run_plan
from megatron_prism.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"


def test_arms_are_registered_and_parsed():
    assert set(ARMS.names()) == {"baseline", "prism", "align-data-as-sft", "dense-disc", "text-only-disc",
                                 "dedicated-experts", "rl-on-align-prompts"}
    control = ARMS.get("rl-on-align-prompts")
    assert "align.policy_reward=verifiable" in control.overrides and "stages.warmup.enabled=false" in control.overrides
    assert [a.name for a in parse_arms("baseline, prism")] == ["baseline", "prism"]
    assert "stages.align.enabled=false" in ARMS.get("baseline").overrides
    assert ARMS.get("align-data-as-sft").sft_splits == ("sft", "align")
    assert "discriminator.mode=text-only" in ARMS.get("text-only-disc").overrides
    with pytest.raises(UnknownNameError, match="did you mean 'baseline'"):
        parse_arms("baselne")
    with pytest.raises(ValueError, match="more than once"):
        parse_arms("baseline,baseline")


def test_every_arm_has_its_stages():
    from megatron_prism.experiments.arms import ARMS

    check_stages_exist([ARMS.get(n) for n in ARMS.names()])  # the game arms included: WARMUP/ALIGN exist


def test_merge_splits_keeps_images_and_prefixes_ids(tmp_path):
    from megatron_prism.data.loader import load_split

    root = tmp_path / "data"
    for split, rid in (("sft", "a"), ("align", "a")):
        (root / split / "img").mkdir(parents=True)
        from PIL import Image  # strict loading decodes every image when the split opens

        Image.new("RGB", (8, 8), (10 * len(split), 0, 0)).save(root / split / "img" / "x.png")
        rec = {"id": rid, "images": ["img/x.png"], "prompt": "<image> what?", "response": f"{split} demo"}
        (root / split / "records.jsonl").write_text(json.dumps(rec) + "\n")
    merged = merge_splits(root, ("sft", "align"), tmp_path / "merged")
    records, _ = load_split(merged, "sft", strict=True)
    assert sorted(r.id for r in records) == ["a", "align/a"]
    assert {r.response for r in records} == {"sft demo", "align demo"}
    assert all(r.images[0].path.is_file() for r in records)
    with pytest.raises(FileNotFoundError, match="split 'rl'"):
        merge_splits(root, ("sft", "rl"), tmp_path / "merged2")


def _eval_report(path: Path, benches: dict[str, dict[str, list[float]]]) -> Path:
    data = {"benchmarks": {name: {"mean_accuracy": sum(sum(s) / len(s) for s in items.values()) / len(items),
                                  "pass_at": {"1": 0.0}, "items": [{"id": i, "scores": s} for i, s in items.items()]}
                           for name, items in benches.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_report_on_constructed_runs(tmp_path):
    # baseline: seed 0 gets items a,b of bench X right half the time; the arm is right more often
    spec = {
        ("baseline", 0): {"X": {"a": [1, 0], "b": [0, 0], "c": [1, 1]}, "Y": {"q": [0, 0], "r": [1, 1]}},
        ("baseline", 1): {"X": {"a": [0, 0], "b": [0, 0], "c": [1, 1]}, "Y": {"q": [0, 0], "r": [0, 0]}},
        ("better", 0): {"X": {"a": [1, 1], "b": [1, 0], "c": [1, 1]}, "Y": {"q": [1, 1], "r": [1, 1]}},
        ("better", 1): {"X": {"a": [1, 1], "b": [0, 0], "c": [1, 1]}, "Y": {"q": [0, 1], "r": [1, 1]}},
    }
    runs = [RunRecord(arm, seed, tmp_path / arm / str(seed), _eval_report(tmp_path / arm / f"{seed}.json", b))
            for (arm, seed), b in spec.items()]
    # each run's report.json, as prism run writes it: the better arm also ran WARMUP and ALIGN
    for run in runs:
        k = run.seed
        stages = [{"stage": "sft", "metrics": {"eval_after": {"eval/slip_rate": 0.6 + 0.1 * k}}},
                  {"stage": "rlvr", "metrics": {"eval_after": {"eval/slip_rate": 0.5, "eval/caption_error_rate": 0.9}}}]
        if run.arm == "better":
            stages[1:1] = [{"stage": "warmup", "metrics": {"heldout_after": {"heldout/caption/acc": 0.7 + 0.2 * k}}},
                           {"stage": "align", "metrics": {"game_before": {"game/objective": -1.0},
                                                          "game_after": {"game/objective": -0.5 - k}}}]
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "report.json").write_text(json.dumps({"stages": stages}))
    report = build_report(runs, meta={"algorithm": "grpo", "k": 2, "temperature": 1.0}, n_boot=500)
    got = report["readouts"]
    assert got["baseline"]["slip rate after SFT"]["mean"] == pytest.approx(0.65)
    assert got["baseline"]["slip rate after SFT"]["std"] == pytest.approx(math.sqrt(0.005))
    assert "WARMUP disc. acc. caption" not in got["baseline"] and "caption error after SFT" not in got["better"]
    assert got["better"]["WARMUP disc. acc. caption"]["mean"] == pytest.approx(0.8)
    assert got["better"]["game objective after ALIGN"]["mean"] == pytest.approx(-1.0)
    # baseline X accuracy: seed 0 (0.5 + 0 + 1)/3 = 0.5, seed 1 (0 + 0 + 1)/3 = 1/3
    assert report["summary"]["baseline"]["X"]["mean"] == pytest.approx(5 / 12)
    assert report["summary"]["baseline"]["X"]["std"] == pytest.approx(math.sqrt(2) * (1 / 12))
    # average over benchmarks, per seed: baseline seed 0 (0.5 + 0.5)/2, seed 1 (1/3 + 0)/2
    assert report["summary"]["baseline"]["average"]["mean"] == pytest.approx((0.5 + 1 / 6) / 2)
    cmp_x = report["comparisons"]["better"]["X"]
    # per-item differences: seed 0 a +0.5 b +0.5 c 0; seed 1 a +1 b 0 c 0 -> mean 2/6
    assert cmp_x["mean_diff"] == pytest.approx(2 / 6)
    assert cmp_x["t_items"]["n"] == 3 and cmp_x["t_seeds"]["n"] == 2
    # item means over seeds: a 0.75, b 0.25, c 0 -> t = mean / (sd / sqrt 3)
    d = [0.75, 0.25, 0.0]
    mu = sum(d) / 3
    sd = math.sqrt(sum((x - mu) ** 2 for x in d) / 2)
    assert cmp_x["t_items"]["t"] == pytest.approx(mu / (sd / math.sqrt(3)))
    # average: per-seed macro differences seed 0 (1/3 + 0.5)/2, seed 1 (1/3 + 0.75)/2
    assert report["comparisons"]["better"]["average"]["mean_diff"] == pytest.approx(((1 / 3 + 0.5) + (1 / 3 + 0.75)) / 4)
    md = render_markdown(report)
    assert "| better |" in md and "Difference to `baseline`" in md and "41.67 ± 11.79" in md
    assert "**p seeds " in md and "(conditional)" in md
    assert "| WARMUP disc. acc. caption | - | 0.800 ± 0.141 |" in md
    assert "| caption error after RLVR | 0.900 ± 0.000 | 0.900 ± 0.000 |" in md


def test_report_rejects_a_run_missing_a_benchmark(tmp_path):
    runs = [RunRecord("baseline", 0, tmp_path, _eval_report(tmp_path / "a.json", {"X": {"a": [1]}})),
            RunRecord("other", 0, tmp_path, _eval_report(tmp_path / "b.json", {"Y": {"a": [1]}}))]
    with pytest.raises(ValueError, match="no result for benchmark"):
        build_report(runs, meta={})


SHORT = ["run.logger=none", "data.synth_sizes=sft=40,align=8,rl=16,eval=8", "stages.sft.steps=2",
         "stages.sft.global_batch_size=4", "stages.sft.save_every=2", "stages.sft.eval_every=0",
         "stages.rlvr.steps=1", "stages.rlvr.global_batch_size=2", "stages.rlvr.save_every=1",
         "stages.rlvr.eval_every=0", "rollout.n=2", "rollout.max_new_tokens=32", "stages.eval.enabled=false",
         "optim.warmup_steps=0"]
# the same-compute control's ALIGN stage, as short as the rest
CONTROL = ["stages.align.steps=1", "stages.align.global_batch_size=2", "stages.align.save_every=1",
           "stages.align.eval_every=0", "align.samples_per_prompt=2"]


def test_experiment_end_to_end_shares_sft_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "exp"
    arms = parse_arms("baseline,rl-on-align-prompts")
    spec = ExperimentSpec(config=TINY, arms=arms, seeds=2, out=out, overrides=[*SHORT, *CONTROL], k=2,
                          temperature=1.0, timeout=600, jobs=2)
    js, md = run_experiment(spec)
    report = json.loads(js.read_text())
    assert report["arms"] == ["baseline", "rl-on-align-prompts"] and report["seeds"] == [0, 1]
    # --jobs 2: the two seeds' baselines ran at once (seed 1 started before seed 0's was evaluated);
    # each control, which reuses its seed's SFT, started only after the baseline that trained it
    started = {(a, k): (out / a / f"seed{k}" / "experiment_run.json").stat().st_mtime for a in ("baseline",
               "rl-on-align-prompts") for k in (0, 1)}
    finished = {(a, k): (out / a / f"seed{k}" / "eval_report.json").stat().st_mtime for a, k in started}
    assert started[("baseline", 1)] < finished[("baseline", 0)] and started[("baseline", 0)] < finished[("baseline", 1)]
    assert all(started[("rl-on-align-prompts", k)] >= finished[("baseline", k)] for k in (0, 1))
    assert report["benchmarks"] == ["heldout"]
    for arm in ("baseline", "rl-on-align-prompts"):
        run = out / arm / "seed0"
        ev = json.loads((run / "eval_report.json").read_text())
        assert ev["k"] == 2 and len(ev["benchmarks"]["heldout"]["items"]) == 8
        assert (run / "report.json").is_file() and "run.seed=1234" in \
            json.loads((run / "experiment_run.json").read_text())["overrides"]
    # the two arms share SFT: it ran once (the baseline's run), the control found it finished
    logs = {arm: (out / arm / "seed0" / "prism_run.log").read_text() for arm in ("baseline", "rl-on-align-prompts")}
    assert logs["baseline"].count("[prism] stage sft: starting") == 1
    assert logs["rl-on-align-prompts"].count("[prism] stage sft: starting") == 0
    assert "stage sft: already finished, skipped" in logs["rl-on-align-prompts"]
    shared = sorted((out / "shared").glob("sft-*"))
    assert len(shared) == 2  # one per seed
    for arm in ("baseline", "rl-on-align-prompts"):
        sft = [s for s in json.loads((out / arm / "seed0" / "report.json").read_text())["stages"] if s["stage"] == "sft"]
        assert any(sft[0]["checkpoint"].startswith(str(d)) for d in shared)
    assert 0.0 <= report["summary"]["baseline"]["heldout"]["mean"] <= 1.0
    assert "baseline" in md.read_text()
    # resumed: every run is reused, nothing is re-run or re-evaluated
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/eval_report.json")}
    assert len(stamps) == 4
    run_experiment(spec)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # the same directory with other settings is refused
    changed = ExperimentSpec(config=TINY, arms=parse_arms("baseline"), seeds=1, out=out,
                             overrides=[*SHORT, "stages.sft.steps=3"], k=2, temperature=1.0)
    with pytest.raises(ExperimentError, match="different settings"):
        run_experiment(changed)


def test_prefix_keys_share_a_stage_exactly_where_arms_run_it_alike(tmp_path):
    from megatron_prism.config import load_config
    from megatron_prism.experiments.arms import ALGORITHMS, ARMS
    from megatron_prism.experiments.shared import prefix_key, shared_stage_overrides

    for split in ("sft", "align", "eval"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "part.jsonl").write_text('{"id": "x"}\n')

    def key(arm: str, stage: str = "sft", *extra: str) -> str:
        cfg = load_config(TINY, [*ARMS.get(arm).overrides, *extra, f"data.root={tmp_path}"])
        return prefix_key(cfg, stage, tmp_path)

    sft = key("baseline")
    assert key("prism") == key("rl-on-align-prompts") == key("dense-disc") == sft
    assert key("baseline", "sft", *ALGORITHMS["gspo"]) == sft  # the RL variant reaches RLVR only
    assert key("baseline", "sft", "stages.rlvr.lr=1e-3", "align.caption_weight=0.3") == sft  # later stages
    for changed in ("run.seed=1", "stages.sft.lr=1e-3", "stages.sft.optim.warmup_steps=3", "data.max_seq_len=200",
                    f"stages.sft.data_path={tmp_path / 'sft'}"):  # align-data-as-sft's merged split is a data_path
        assert key("baseline", "sft", changed) != sft, changed
    warm = key("prism", "warmup")
    assert warm != sft and key("text-only-disc", "warmup") != warm and key("dense-disc", "warmup") != warm
    assert key("prism", "warmup", "stages.align.lr=1e-3", *ALGORITHMS["dapo"]) == warm
    assert key("prism", "warmup", "stages.sft.steps=301") != warm  # a different SFT under it
    (tmp_path / "sft" / "part.jsonl").write_text('{"id": "x"}\n{"id": "y"}\n')  # other data, same path
    assert key("baseline") != sft
    cfg = load_config(TINY, [*ARMS.get("baseline").overrides, f"data.root={tmp_path}"])
    (line,) = shared_stage_overrides(cfg, tmp_path, tmp_path / "shared")  # warmup is disabled in the baseline
    assert line.startswith(f"stages.sft.output_dir={tmp_path / 'shared'}/sft-")


def test_run_plan_starts_what_is_ready_and_waits_for_a_shared_stage(tmp_path):
    """run_plan with 2 jobs: a run that reuses a shared SFT starts only after the run training it
    ends; runs that do not wait overlap; the first failure is raised and nothing new starts."""
    import threading
    import time as clock


    arms = {a.name: a for a in parse_arms("baseline,prism,align-data-as-sft")}
    order = [(arms[a], s) for s in (0, 1) for a in ("baseline", "prism", "align-data-as-sft")]
    shares = {"baseline": ["sft-A"], "prism": ["sft-A", "warm-B"], "align-data-as-sft": ["sft-M"]}
    spans: dict[tuple[str, int], tuple[float, float]] = {}
    lock = threading.Lock()

    def run(arm, seed):
        start = clock.monotonic()
        clock.sleep(0.2)
        with lock:
            spans[(arm.name, seed)] = (start, clock.monotonic())
        return RunRecord(arm.name, seed, tmp_path, tmp_path / "r.json")

    spec = ExperimentSpec(config=TINY, arms=list(arms.values()), seeds=2, jobs=2)
    done = run_plan(spec, order, run, lambda arm, seed: [f"{d}-{seed}" for d in shares[arm.name]])
    assert sorted(done) == sorted((a.name, s) for a, s in order)
    for seed in (0, 1):  # prism reuses its seed's baseline SFT
        assert spans[("prism", seed)][0] >= spans[("baseline", seed)][1]
    # align-data-as-sft trains its own SFT: it ran beside seed 0's baseline
    assert spans[("align-data-as-sft", 0)][0] < spans[("baseline", 0)][1]

    started = []

    def failing(arm, seed):
        started.append((arm.name, seed))
        if arm.name == "baseline":
            raise ExperimentError(f"prism run of baseline seed {seed} failed")
        return RunRecord(arm.name, seed, tmp_path, tmp_path / "r.json")

    with pytest.raises(ExperimentError, match="baseline seed 0 failed"):
        run_plan(dataclasses.replace(spec, jobs=1), order, failing,
                 lambda arm, seed: [f"{d}-{seed}" for d in shares[arm.name]])
    assert started == [("baseline", 0)]
