"""Evaluation statistics and plumbing with a fake generator of predetermined responses: mean accuracy,
std across samples, the unbiased pass@k estimator (against brute-force enumeration of subsets),
per-item results, the report, paired comparison; and scoring with the real rewards once they exist."""

from __future__ import annotations

import itertools
import json
import re
import statistics
from math import comb

import pytest
from bench_fixtures import write_hallusion_json, write_mathvista_parquet, write_mmmu, write_wemath

from megatron_prism.data.records import Record
from megatron_prism.eval import (
    EvalReport,
    evaluate,
    hallusion_accuracies,
    load_benchmark,
    paired_comparison,
    pass_at_k,
    scorer_from,
)


def prism(answer: str, caption: str = "The figure shows a diagram.", think: str = "Reasoning step by step.") -> str:
    return f"<caption>{caption}</caption><think>{think}</think><answer>{answer}</answer>"


def exact(response: str, record: Record) -> float:
    """A stand-in scorer: the <answer> block equals the ground truth."""
    found = re.findall(r"<answer>(.*?)</answer>", response, re.S)
    return float(bool(found) and found[-1].strip() == record.answer)


def recs(name: str, answers: list[str]) -> list[Record]:
    return [Record(id=f"{name}-{i}", prompt=f"q{i}", answer=a, source=name, meta={"reward": "math"})
            for i, a in enumerate(answers)]


class FakeGenerator:
    """Returns predetermined responses by record id; remembers how it was called."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[tuple[list[str], int, float, int]] = []

    def __call__(self, records, k, temperature, seed):
        self.calls.append(([r.id for r in records], k, temperature, seed))
        return [self.table[r.id][:k] for r in records]


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0 and pass_at_k(4, 1, 1) == 0.25
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def make_runs():
    a, b = recs("a", ["3", "x", "7"]), recs("b", ["1", "2"])
    right, wrong = prism, lambda ans: prism(ans + "0")
    table = {
        "a-0": [right("3"), right("3"), wrong("3"), "no tags: 3"],  # 1 1 0 0
        "a-1": [wrong("x")] * 4,                                   # 0 0 0 0
        "a-2": [right("7")] * 4,                                   # 1 1 1 1
        "b-0": [right("1"), wrong("1"), wrong("1"), wrong("1")],   # 1 0 0 0
        "b-1": [wrong("2"), right("2"), right("2"), right("2")],   # 0 1 1 1
    }
    return {"bench_a": a, "bench_b": b}, FakeGenerator(table)


def test_evaluate_statistics_by_hand():
    benches, gen = make_runs()
    report = evaluate(benches, gen, k=4, temperature=0.7, seed=11, scorer=scorer_from(exact))
    assert gen.calls == [(["a-0", "a-1", "a-2"], 4, 0.7, 11), (["b-0", "b-1"], 4, 0.7, 11)]
    a, b = report.benchmarks["bench_a"], report.benchmarks["bench_b"]
    assert [it.scores for it in a.items] == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert [it.id for it in a.items] == ["a-0", "a-1", "a-2"] and a.n_items == 3 and a.k == 4
    assert a.sample_accuracies == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert a.mean_accuracy == pytest.approx(0.5)
    assert a.std_across_samples == pytest.approx((1 / 27) ** 0.5)  # deviations ±1/6, ddof=1
    # pass@k' per item (n=4): item 0 has c=2 -> 1/2, 5/6, 1, 1; item 1 -> 0; item 2 -> 1
    assert a.pass_at == pytest.approx({1: 0.5, 2: (5 / 6 + 1) / 3, 3: 2 / 3, 4: 2 / 3})
    assert b.sample_accuracies == pytest.approx([0.5] * 4) and b.std_across_samples == 0.0
    assert b.pass_at == pytest.approx({1: 0.5, 2: (0.5 + 1) / 2, 3: (0.75 + 1) / 2, 4: 1.0})  # b-0: c=1
    avg = report.average
    assert avg["n_items"] == 5 and avg["n_benchmarks"] == 2 and avg["mean_accuracy"] == pytest.approx(0.5)
    assert avg["sample_accuracies"] == pytest.approx([7 / 12, 7 / 12, 5 / 12, 5 / 12])
    assert avg["std_across_samples"] == pytest.approx(statistics.stdev([7 / 12, 7 / 12, 5 / 12, 5 / 12]))
    assert avg["pass_at"][4] == pytest.approx((2 / 3 + 1) / 2) and avg["pass_at"][1] == pytest.approx(0.5)


def test_pass_at_1_is_mean_accuracy_and_k1_has_no_spread():
    benches, gen = make_runs()
    report = evaluate(benches, gen, k=1, scorer=scorer_from(exact))
    for bench in report.benchmarks.values():
        assert bench.pass_at == {1: pytest.approx(bench.mean_accuracy)} and bench.std_across_samples == 0.0
    assert gen.calls[0][1:] == (1, 0.0, 0)


def test_report_json_and_table(tmp_path):
    benches, gen = make_runs()
    report = evaluate(benches, gen, k=4, temperature=1.0, seed=3, scorer=scorer_from(exact))
    data = json.loads(json.dumps(report.to_json()))
    assert data["k"] == 4 and data["seed"] == 3 and data["temperature"] == 1.0
    assert data["benchmarks"]["bench_a"]["pass_at"]["4"] == pytest.approx(2 / 3)
    assert data["benchmarks"]["bench_a"]["items"][0] == {"id": "a-0", "scores": [1.0, 1.0, 0.0, 0.0]}
    assert json.loads(report.save(tmp_path / "r.json").read_text()) == data
    table = report.table()
    assert isinstance(report, EvalReport)
    lines = table.splitlines()
    assert lines[0] == "k=4 temperature=1.0 seed=3"
    assert re.match(r"bench_a\s+3\s+50\.00 ± 19\.25\s+50\.00\s+66\.67$", lines[3]), lines[3]
    assert re.match(r"average\s+5\s+50\.00 ± 9\.62\s+50\.00\s+83\.33$", lines[-1]), lines[-1]


def test_generate_and_scorer_contract_errors():
    benches, gen = make_runs()
    short = lambda records, k, t, s: [["x"] * (k - 1) for _ in records]  # noqa: E731
    with pytest.raises(ValueError, match="expected 3 lists of 4"):
        evaluate(benches, short, k=4, scorer=scorer_from(exact))
    with pytest.raises(ValueError, match="no items"):
        evaluate({"empty": []}, gen, k=1, scorer=scorer_from(exact))
    with pytest.raises(ValueError, match="k must be >= 1"):
        evaluate(benches, gen, k=0, scorer=scorer_from(exact))


def test_paired_comparison():
    benches, gen = make_runs()
    base = evaluate(benches, gen, k=4, scorer=scorer_from(exact)).benchmarks["bench_a"]
    better = evaluate(benches, gen, k=4, scorer=scorer_from(lambda r, rec: 1.0)).benchmarks["bench_a"]
    diff = paired_comparison(base, better)  # per-item gains 0.5, 1, 0
    assert diff["n"] == 3 and diff["mean_diff"] == pytest.approx(0.5)
    assert diff["std_error"] == pytest.approx(statistics.stdev([0.5, 1.0, 0.0]) / 3 ** 0.5)


def test_hallusion_question_and_figure_accuracy(tmp_path):
    records = load_benchmark("hallusion_bench", write_hallusion_json(tmp_path), strict=True)
    # ids: VD_ocr_0_0_0 (q0 fig0), VD_ocr_0_1_0 (q0 fig1), VD_ocr_0_0_1 (q1 fig0), VS_chart_1_0_0, VS_chart_1_1_0
    scores = {r.id: [1.0] for r in records}
    scores["hallusion-VD_ocr_0_1_0"] = [0.0]
    acc = hallusion_accuracies(records, scores)
    assert acc["aAcc"] == pytest.approx(4 / 5)
    assert acc["qAcc"] == pytest.approx(2 / 3)  # questions: VD q0 (fig0 right, fig1 wrong), VD q1, VS q0
    assert acc["fAcc"] == pytest.approx(2 / 3)  # figures: VD fig0, VD fig1 (wrong), VS fig1 (VS fig0 has none)
    gen = FakeGenerator({r.id: [prism("Yes")] for r in records})
    yes = scorer_from(lambda resp, rec: float(rec.answer == "yes"))
    report = evaluate({"hallusion": records}, gen, k=1, scorer=yes)
    assert report.benchmarks["hallusion"].extra == pytest.approx({"aAcc": 0.6, "qAcc": 1 / 3, "fAcc": 1 / 3})
    assert "hallusion: aAcc 60.00" in report.table()


# ------------------------------------------------------------------- with the real rewards

def test_real_rewards_on_prism_responses(tmp_path):
    from megatron_prism.eval import RewardScorer

    write_mathvista_parquet(tmp_path / "mv")
    write_mmmu(tmp_path / "mmmu")
    benches = {
        "mathvista": load_benchmark("mathvista", tmp_path / "mv", strict=True),
        "wemath": load_benchmark("wemath", write_wemath(tmp_path / "we"), strict=True),
        "mmmu": load_benchmark("mmmu", tmp_path / "mmmu", strict=True),
        "hallusion_bench": load_benchmark("hallusion_bench", write_hallusion_json(tmp_path / "hb"), strict=True),
    }
    table = {
        # MathVista: letter, choice text, integer, float within precision, list
        "mathvista-1": [prism("C"), prism("tokyo"), prism("A")],
        "mathvista-2": [prism("14"), prism("14.0"), prism("15")],
        "mathvista-3": [prism("1.45"), prism("1.451"), prism("1.5")],
        "mathvista-4": [prism("[2007, 2008]"), prism("[2007, 2009]"), "no answer tags"],
        "wemath-2steps_1-2steps_1": [prism("B"), prism("B. 12"), prism("C")],
        "wemath-2steps_1-2steps_multi": [prism("C"), prism("14"), prism("D")],
        "mmmu-validation_Accounting_1": [prism("B"), prism("(B) $7"), prism("D")],
        "mmmu-validation_Accounting_2": [prism("A"), prism("A"), prism("B")],
        "mmmu-validation_Math_1": [prism("0.5"), prism("\\frac{1}{2}"), prism("2")],  # alternatives accepted
        "mmmu-validation_Math_2": [prism("parabola"), prism("parabola"), prism("hyperbola")],
    }
    for rec in benches["hallusion_bench"]:
        right = "Yes" if rec.answer == "yes" else "No"
        table[rec.id] = [prism(right), prism(right + ", it is."), prism("No" if right == "Yes" else "Yes")]
    report = evaluate(benches, FakeGenerator(table), k=3, scorer=RewardScorer(timeout_s=10.0, workers=1))
    for name, bench in report.benchmarks.items():
        scores = {it.id: it.scores for it in bench.items}
        for rid, row in scores.items():
            assert row[0] == 1.0 and row[2] == 0.0, (name, rid, row)
    mv = {it.id: it.scores for it in report.benchmarks["mathvista"].items}
    assert mv["mathvista-1"][1] == 1.0 and mv["mathvista-2"][1] == 1.0 and mv["mathvista-3"][1] == 1.0
    assert mv["mathvista-4"][1] == 0.0
