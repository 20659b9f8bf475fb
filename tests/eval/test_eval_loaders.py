"""Benchmark loaders on tiny files in each published layout: fields, answers in the form their reward
expects, reward routing, images, and bad input (strict error naming file and row, or counted skip)."""

from __future__ import annotations

import json

import pytest
from bench_fixtures import (
    hf_image,
    mathvista_rows,
    mmmu_row,
    write_hallusion_json,
    write_hallusion_parquet,
    write_mathverse,
    write_mathvision,
    write_mathvista_json,
    write_mathvista_parquet,
    write_mmmu,
    write_mmmu_pro,
    write_parquet,
    write_wemath,
)

from megatron_prism.data.chat import render_prompt
from megatron_prism.data.records import RecordError, SkipCounter
from megatron_prism.eval import BENCHMARKS, load_benchmark, reward_call
from megatron_prism.eval.loading import parse_options
from megatron_prism.registry import UnknownNameError


def by_id(records):
    return {r.id: r for r in records}


def test_registry_names_and_unknown():
    assert BENCHMARKS.names() == ["hallusion_bench", "mathverse", "mathvision", "mathvista", "mmmu", "mmmu_pro",
                                  "wemath"]
    with pytest.raises(UnknownNameError, match="did you mean 'mathvista'"):
        BENCHMARKS.get("mathvist")


@pytest.mark.parametrize("layout", ["parquet", "json"])
def test_mathvista(tmp_path, layout):
    path = write_mathvista_parquet(tmp_path) if layout == "parquet" else write_mathvista_json(tmp_path)
    recs = by_id(load_benchmark("mathvista", tmp_path if layout == "parquet" else path, strict=True))
    assert list(recs) == ["mathvista-1", "mathvista-2", "mathvista-3", "mathvista-4"]
    mc = recs["mathvista-1"]
    assert mc.answer == "C" and mc.meta["options"] == ["hong kong", "osaka", "tokyo"]  # the text "tokyo" -> C
    assert reward_call(mc) == ("choice", {"options": ["hong kong", "osaka", "tokyo"]})
    assert mc.prompt.startswith("Hint:") and "(C) tokyo" in mc.prompt  # the official query
    assert mc.meta["metadata"]["skills"] == ["geometry reasoning"] and mc.source == "mathvista"
    assert reward_call(recs["mathvista-2"]) == ("numeric", {"rel_tol": 0.0})
    name, kw = reward_call(recs["mathvista-3"])
    assert name == "numeric" and recs["mathvista-3"].meta["precision"] == 2
    assert kw == {"rel_tol": 0.0, "abs_tol": pytest.approx(0.005)}  # rounding to 2 decimals: within 0.005
    assert reward_call(recs["mathvista-4"])[0] == "math" and recs["mathvista-4"].answer == "[2007, 2008]"
    for rec in recs.values():
        (img,) = rec.images
        assert img.data[:4] == b"\x89PNG" if layout == "parquet" else img.path.suffix == ".jpg" and img.path.is_file()
        assert render_prompt(rec).count("<|image_pad|>") == 1


def test_mathverse(tmp_path):
    write_mathverse(tmp_path)
    recs = by_id(load_benchmark("mathverse", tmp_path, strict=True))
    mc = recs["mathverse-1"]
    assert mc.answer == "B" and mc.meta["options"] == ["40°", "50°", "60°", "70°"]
    assert mc.prompt.startswith("Please answer the question.") and mc.meta["question_for_eval"] == "find angle BCD"
    assert reward_call(recs["mathverse-2"]) == ("math", {}) and recs["mathverse-2"].answer == "2\\sqrt{3}"
    vision_only = recs["mathverse-3"]  # choices drawn in the image: letters stand in for the options
    assert vision_only.answer == "C" and vision_only.meta["options"] == ["A", "B", "C", "D"]
    assert recs["mathverse-4"].images == [] and recs["mathverse-4"].meta["problem_version"] == "Text Only"


@pytest.mark.parametrize("split", ["testmini", "test"])
def test_mathvision(tmp_path, split):
    write_mathvision(tmp_path, "testmini")
    write_mathvision(tmp_path, "test")
    recs = by_id(load_benchmark("mathvision", tmp_path, split=split, strict=True))
    assert len(recs) == 3  # "test" does not also pick up testmini.jsonl
    assert all(r.origin.startswith(str(tmp_path / f"{split}.jsonl")) for r in recs.values())
    assert recs["mathvision-1"].answer == "C" and recs["mathvision-1"].meta["options"] == ["A", "B", "C", "D", "E"]
    assert "(E) E" in recs["mathvision-1"].prompt
    assert reward_call(recs["mathvision-2"]) == ("math", {}) and recs["mathvision-2"].answer == "17"
    assert recs["mathvision-3"].answer == "B"  # an answer given as the option text
    assert recs["mathvision-2"].images[0].path == (tmp_path / "images" / "2.jpg").resolve()


def test_wemath(tmp_path):
    path = write_wemath(tmp_path)
    one, multi = load_benchmark("wemath", path, strict=True)
    assert one.id == "wemath-2steps_1-2steps_1" and multi.id == "wemath-2steps_1-2steps_multi"
    assert one.meta["options"] == ["7", "12", "14", "24", "No correct answer"] and one.answer == "B"
    assert one.prompt == "The rectangle is 3 by 4. What is its area?\nA. 7; B. 12; C. 14; D. 24; E. No correct answer"
    assert multi.answer == "C" and multi.meta["key"] == "2steps_multi"
    assert one.images[0].path == (tmp_path / "images" / "2steps_1.png").resolve()  # image folder beside the JSON


def test_parse_options_layouts():
    assert parse_options("A. 7; B. 12; C. 14") == ["7", "12", "14"]
    assert parse_options("A:40°\nB:50°") == ["40°", "50°"]
    assert parse_options("(A) x\n(B) y z") == ["x", "y z"]
    assert parse_options("B. 1; C. 2") == [] and parse_options("no options") == []


def test_mmmu(tmp_path):
    write_mmmu(tmp_path)
    recs = by_id(load_benchmark("mmmu", tmp_path, strict=True))
    assert sorted(recs) == ["mmmu-validation_Accounting_1", "mmmu-validation_Accounting_2",
                            "mmmu-validation_Math_1", "mmmu-validation_Math_2"]  # dev split left out
    mc = recs["mmmu-validation_Accounting_1"]
    assert mc.answer == "B" and mc.meta["options"] == ["$6", "$7", "$8", "$9"] and mc.meta["subject"] == "Accounting"
    assert "<image 1>" in mc.prompt and "(B) $7" in mc.prompt and len(mc.images) == 1
    multi = recs["mmmu-validation_Accounting_2"]  # images named in question and options, sorted: 1, 2, 3
    assert [img.data for img in multi.images] == [hf_image()["bytes"], hf_image((0, 0, 9))["bytes"],
                                                  hf_image((9, 0, 0))["bytes"]]
    assert render_prompt(multi).count("<|image_pad|>") == 3
    slope = recs["mmmu-validation_Math_1"]
    assert slope.answer == "0.5" and slope.meta["alternatives"] == ["1/2"] and reward_call(slope)[0] == "math"
    assert reward_call(recs["mmmu-validation_Math_2"]) == ("math", {})


def test_mmmu_open_numeric(tmp_path):
    write_parquet(tmp_path / "validation-0.parquet",
                  [mmmu_row(1, "Physics", question="<image 1> g?", options="[]", answer="9.8", question_type="open")])
    (rec,) = load_benchmark("mmmu", tmp_path, strict=True)
    assert reward_call(rec) == ("numeric", {"rel_tol": 0.01})


def test_mmmu_pro_standard_and_vision(tmp_path):
    standard, vision = write_mmmu_pro(tmp_path)
    (std,) = load_benchmark("mmmu_pro", standard.parent, strict=True)
    assert std.id == "mmmu_pro-test_History_1" and std.answer == "J" and len(std.meta["options"]) == 10
    assert "(J) opt9" in std.prompt and std.meta["subject"] == "History"
    (vis,) = load_benchmark("mmmu_pro", vision, strict=True)
    assert vis.answer == "C" and vis.meta["setting"] == "vision" and len(vis.images) == 1
    assert vis.prompt.startswith("Options:\n(A) red")
    assert len(load_benchmark("mmmu_pro", tmp_path, strict=True)) == 2  # both configs under one folder


def test_hallusion_json_and_parquet(tmp_path):
    path = write_hallusion_json(tmp_path / "json")
    recs = load_benchmark("hallusion_bench", path, strict=True)
    assert [r.answer for r in recs] == ["yes", "no", "yes", "yes", "no"]
    assert all(reward_call(r) == ("yesno", {}) for r in recs)
    first = recs[0]
    assert first.id == "hallusion-VD_ocr_0_0_0" and first.meta["gt_answer_details"] == "details"
    assert first.images[0].path == (tmp_path / "json" / "hallusion_bench" / "VD" / "ocr" / "0_0.png").resolve()
    assert recs[3].images == [] and recs[3].meta["visual_input"] == "0"  # no visual input: text only
    write_hallusion_parquet(tmp_path / "hf")
    image_split = load_benchmark("hallusion_bench", tmp_path / "hf", strict=True)  # "image", not "non_image"
    assert len(image_split) == 4 and all(r.images and r.images[0].data for r in image_split)


# ------------------------------------------------------------------------------------- bad input

def test_missing_image_strict_and_lenient(tmp_path):
    path = write_mathvista_json(tmp_path)
    (tmp_path / "images" / "2.jpg").unlink()
    with pytest.raises(RecordError, match=r"testmini.json:row 2: image 'images/2.jpg' does not exist"):
        load_benchmark("mathvista", path, strict=True)
    skips = SkipCounter()
    recs = load_benchmark("mathvista", path, skips=skips)
    assert [r.id for r in recs] == ["mathvista-1", "mathvista-3", "mathvista-4"]
    assert skips.counts == {"missing image": 1}


def test_malformed_rows_lenient_counts(tmp_path):
    rows = [dict(r, image="x.png", decoded_image=hf_image()) for r in mathvista_rows()]
    rows[0]["answer"] = "kyoto"  # matches no choice
    rows[1]["question"] = None
    rows[2]["answer"] = "about three"  # float answer that is no number
    path = write_parquet(tmp_path / "testmini.parquet", rows)
    skips = SkipCounter()
    assert [r.id for r in load_benchmark("mathvista", path, skips=skips)] == ["mathvista-4"]
    assert skips.total == 3 and skips.counts["bad answer"] == 2 and skips.counts["missing field"] == 1
    with pytest.raises(RecordError, match=r"testmini.parquet:row 1: answer 'kyoto' matches no option"):
        load_benchmark("mathvista", path, strict=True)


def test_malformed_jsonl_and_unusable_files(tmp_path):
    path = write_mathvision(tmp_path)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(RecordError, match=r"testmini.jsonl:row 4: malformed JSON"):
        load_benchmark("mathvision", path, strict=True)
    skips = SkipCounter()
    assert len(load_benchmark("mathvision", path, skips=skips)) == 3 and skips.counts == {"malformed JSON": 1}
    with pytest.raises(RecordError, match="no such benchmark file"):
        load_benchmark("mmmu", tmp_path / "nowhere")
    (tmp_path / "x.json").write_text("{broken")
    with pytest.raises(RecordError, match="not a readable JSON file"):
        load_benchmark("wemath", tmp_path / "x.json")
    with pytest.raises(RecordError, match="no .parquet/.jsonl/.json files for split 'validation'"):
        load_benchmark("mmmu", tmp_path / "images")
    (tmp_path / "hb.json").write_text(json.dumps([{"category": "VD"}]))
    with pytest.raises(RecordError, match=r"hb.json:row 1: missing field 'subcategory'"):
        load_benchmark("hallusion_bench", tmp_path / "hb.json", strict=True)


def test_marker_count_must_match_images(tmp_path):
    rows = [dict(mathvista_rows()[1], image="x.png", decoded_image=hf_image(), query="<image><image> How many?")]
    with pytest.raises(RecordError, match="2 <image> markers but the row has 1 images"):
        load_benchmark("mathvista", write_parquet(tmp_path / "testmini.parquet", rows), strict=True)


def test_mmmu_missing_referenced_image(tmp_path):
    write_parquet(tmp_path / "validation.parquet", [mmmu_row(1, "Art", question="<image 2> and <image 1>?")])
    with pytest.raises(RecordError, match=r"validation.parquet:row 1: the text names <image 2> but field 'image_2'"):
        load_benchmark("mmmu", tmp_path / "validation.parquet", strict=True)
