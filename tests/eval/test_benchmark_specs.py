"""`--benchmark NAME=PATH[:SPLIT]`: checked before anything is built (registered name with a did-you-mean,
a path that exists, files for the split), the split chosen (MathVision's `test`), and `prism eval`'s
per-benchmark progress lines."""

from __future__ import annotations

import re

import pytest

from megatron_prism.data.records import RecordError
from megatron_prism.eval import BenchmarkSpec, evaluate, parse_benchmark

from bench_fixtures import write_mathvision


def test_name_path_and_split(tmp_path):
    write_mathvision(tmp_path, "testmini")
    write_mathvision(tmp_path, "test")
    default = parse_benchmark(f"mathvision={tmp_path}")
    assert default == BenchmarkSpec("mathvision", tmp_path, None) and default.default_split() == "testmini"
    test = parse_benchmark(f"mathvision={tmp_path}:test")
    assert test == BenchmarkSpec("mathvision", tmp_path, "test") and test.arg() == f"mathvision={tmp_path}:test"
    assert {r.origin.split(":")[0] for r in default.load(strict=True)} == {str(tmp_path / "testmini.jsonl")}
    assert {r.origin.split(":")[0] for r in test.load(strict=True)} == {str(tmp_path / "test.jsonl")}


@pytest.mark.parametrize("arg,words", [
    ("mathvista=/nothere", "--benchmark mathvista=/nothere: /nothere does not exist; give the local folder"),
    ("mathvistaa=/tmp", "unknown benchmark 'mathvistaa'; did you mean 'mathvista'?"),
    ("mathvista", "expected NAME=PATH[:SPLIT]"),
    ("=/tmp", "expected NAME=PATH[:SPLIT]"),
])
def test_bad_benchmark_arguments_are_one_line(arg, words):
    with pytest.raises(RecordError) as err:
        parse_benchmark(arg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_split_without_files_is_named(tmp_path):
    write_mathvision(tmp_path, "testmini")
    with pytest.raises(RecordError, match=r"no .parquet/.jsonl/.json files for split 'test'"):
        parse_benchmark(f"mathvision={tmp_path}:test")


def test_evaluate_prints_a_line_per_benchmark_start_and_end(tmp_path):
    write_mathvision(tmp_path, "testmini")
    records = parse_benchmark(f"mathvision={tmp_path}").load(strict=True)
    lines: list[str] = []
    evaluate({"mathvision": records, "again": records}, lambda recs, k, t, s: [["<answer>A</answer>"] * k for _ in recs],
             k=2, temperature=0.5, progress=lines.append)
    n = len(records)
    assert lines[0] == f"[eval] mathvision (1/2): {n} items x 2 samples at temperature 0.5"
    assert re.fullmatch(rf"\[eval\] mathvision \(1/2\): accuracy \d+\.\d\d% ± 0\.00, pass@2 \d+\.\d\d% in \d+s; "
                        rf"eta \d+s for {n} more items", lines[1]), lines[1]
    assert lines[2].startswith("[eval] again (2/2):") and "eta" not in lines[3]
