"""Importers of PRISM's published layouts: tiny fixture files in verl's RL Parquet layout and in
LLaMA-Factory's ShareGPT layout, converted to JSONL and read back as records."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_prism.data.chat import render_prompt
from megatron_prism.data.importers import import_records, main
from megatron_prism.data.records import RecordError, SkipCounter, read_records

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "You are a helpful scientific assistant.\n<caption>...</caption><think>...</think><answer>...</answer>"


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def verl_row(index: int, question: str, answer: object, images: list[bytes], **extra) -> dict:
    return {
        "data_source": "hiyouga/geometry3k",
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "images": [{"bytes": b, "path": None} for b in images],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": "train", "index": index, "answer": str(answer), "question": question},
        **extra,
    }


def write_verl(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_round_trip(tmp_path):
    red, jpeg = image_bytes((255, 0, 0)), image_bytes((0, 0, 255), "JPEG")
    src = write_verl(tmp_path / "train.parquet", [
        verl_row(0, "<image>\nFind x.", "4", [red]),
        verl_row(1, "<image>\nWhat is the area?", "12\\sqrt{3}", [jpeg]),
    ])
    out = tmp_path / "out" / "rl.jsonl"
    records = import_records("verl-parquet", src, out, "rl")
    assert len(records) == 2
    back = list(read_records(out, "rl", strict=True))
    assert [r.id for r in back] == ["hiyouga/geometry3k-0", "hiyouga/geometry3k-1"]
    first = back[0]
    assert first.answer == "4" and first.source == "hiyouga/geometry3k"
    assert first.prompt == "<image>\nFind x." and first.messages is None
    assert first.meta["system_prompt"] == SYSTEM and first.meta["reward_style"] == "rule"
    assert first.meta["extra_info"]["index"] == 0 and first.meta["ability"] == "math"
    # images were written as PNG files beside the JSONL, same pixels (the JPEG re-encoded as PNG)
    for rec, color in zip(back, [(255, 0, 0), None]):
        (img,) = rec.images
        assert img.path.is_file() and img.path.parent == out.parent / "rl_images"
        with Image.open(img.path) as im:
            assert im.format == "PNG" and im.size == (8, 6)
            if color:
                assert im.convert("RGB").getpixel((3, 3)) == color
    line = json.loads(out.read_text().splitlines()[0])
    assert line["images"] == ["rl_images/hiyouga_geometry3k-0_0.png"]  # relative to the JSONL
    assert "<|image_pad|>" in render_prompt(first)


def test_verl_keep_system_and_alignment_teacher_response(tmp_path):
    row = verl_row(3, "<image>\nHow many?", 7, [image_bytes((0, 255, 0))],
                   teacher_response="<caption>c</caption><think>t</think><answer>7</answer>",
                   teacher_caption="c", teacher_cot="t")
    src = write_verl(tmp_path / "align.parquet", [row])
    (rec,) = import_records("verl-parquet", src, tmp_path / "align.jsonl", "align", keep_system=True)
    assert rec.messages[0] == {"role": "system", "content": SYSTEM} and rec.prompt is None
    assert rec.response.endswith("<answer>7</answer>") and rec.answer == "7"
    assert rec.meta["teacher_caption"] == "c" and "system_prompt" not in rec.meta
    (back,) = read_records(tmp_path / "align.jsonl", "align", strict=True)
    assert back.messages == rec.messages and render_prompt(back).startswith("<|im_start|>system\nYou are a helpful")


def test_verl_bad_rows_counted_or_strict(tmp_path):
    rows = [
        verl_row(0, "<image>\nok", "1", [image_bytes((1, 2, 3))]),
        verl_row(1, "<image>\nno answer", "", [image_bytes((1, 2, 3))]),
        verl_row(2, "<image>\nbroken image", "2", [b"not an image"]),
        verl_row(3, "<image><image>\ntwo markers", "3", [image_bytes((1, 2, 3))]),
    ]
    src = write_verl(tmp_path / "mixed.parquet", rows)
    skips = SkipCounter()
    records = import_records("verl-parquet", src, tmp_path / "mixed.jsonl", "rl", skips=skips)
    assert [r.id for r in records] == ["hiyouga/geometry3k-0"]
    assert skips.counts == {"empty field": 1, "bad image": 1, "image count": 1}
    with pytest.raises(RecordError, match=r"mixed.parquet:row 2: rl records need a non-empty 'answer'"):
        import_records("verl-parquet", src, tmp_path / "strict.jsonl", "rl", strict=True)


def write_sharegpt(folder: Path) -> Path:
    (folder / "imgs").mkdir(parents=True)
    for name, color in (("a.png", (10, 20, 30)), ("b.png", (40, 50, 60))):
        Image.new("RGB", (5, 5), color).save(folder / "imgs" / name)
    data = [
        {"messages": [{"role": "user", "content": "<image>What is shown?"},
                      {"role": "assistant", "content": "<caption>a</caption><think>b</think><answer>cat</answer>"}],
         "images": ["imgs/a.png"]},
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "<image>Count them."},
                           {"from": "gpt", "value": "There are 3."},
                           {"from": "human", "value": "<image>And here?"},
                           {"from": "gpt", "value": "<answer>5</answer>"}],
         "images": ["imgs/a.png", "imgs/b.png"], "id": "conv-2"},
        {"messages": [{"role": "user", "content": "<image>missing"}, {"role": "assistant", "content": "x"}],
         "images": ["imgs/nope.png"]},
        {"messages": [{"role": "tool", "content": "?"}]},
        {"text": "no conversation"},
    ]
    path = folder / "sft.json"
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_round_trip(tmp_path):
    src = write_sharegpt(tmp_path / "data")
    out = tmp_path / "converted" / "sft.jsonl"  # images stay where they are, referenced with ../
    skips = SkipCounter()
    records = import_records("sharegpt", src, out, "sft", skips=skips)
    assert [r.id for r in records] == ["sft-1", "conv-2"]
    assert skips.counts == {"missing image": 1, "bad turns": 1, "invalid record": 1}
    back = list(read_records(out, "sft", strict=True))
    one, two = back
    assert one.prompt == "<image>What is shown?" and one.response.endswith("<answer>cat</answer>")
    assert one.images[0].path.resolve() == (tmp_path / "data" / "imgs" / "a.png").resolve()
    assert two.meta["system_prompt"] == "Be brief."
    assert [m["role"] for m in two.messages] == ["user", "assistant", "user"]
    assert two.response == "<answer>5</answer>" and len(two.images) == 2
    assert render_prompt(two).count("<|image_pad|>") == 2
    assert json.loads(out.read_text().splitlines()[0])["images"] == ["../data/imgs/a.png"]


def test_sharegpt_jsonl_with_image_root(tmp_path):
    (tmp_path / "media").mkdir()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "media" / "x.jpg")
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}],
                               "images": ["x.jpg"]}) + "\n{broken\n")
    skips = SkipCounter()
    (rec,) = import_records("sharegpt", src, tmp_path / "o.jsonl", "sft", image_root=tmp_path / "media", skips=skips)
    assert rec.images[0].path == (tmp_path / "media" / "x.jpg").resolve() and skips.counts == {"malformed JSON": 1}


def test_cli_reports_and_exit_codes(tmp_path, capsys):
    src = write_verl(tmp_path / "t.parquet", [verl_row(0, "<image>\nq", "1", [image_bytes((0, 0, 0))]),
                                               verl_row(1, "<image>\nq", "", [image_bytes((0, 0, 0))])])
    assert main(["verl-parquet", str(src), str(tmp_path / "o.jsonl"), "--kind", "rl"]) == 0
    assert "imported 1 records" in capsys.readouterr().out
    # unusable inputs: one line on stderr, exit 2
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "other.parquet")
    cases = [
        (["verl-parquet", str(tmp_path / "missing.parquet")], "no such input file"),
        (["verl-parquet", str(tmp_path / "bad.parquet")], "not a readable Parquet file"),
        (["verl-parquet", str(tmp_path / "other.parquet")], "not verl's RL layout"),
        (["verl-parquet", str(src), "--strict"], "t.parquet:row 2"),
        (["sharegpt", str(src)], "must be a .json or .jsonl file"),
    ]
    for args, message in cases:
        assert main([*args[:2], str(tmp_path / "x.jsonl"), "--kind", "rl", *args[2:]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    only_bad = tmp_path / "empty.json"
    only_bad.write_text(json.dumps([{"text": "x"}]))
    assert main(["sharegpt", str(only_bad), str(tmp_path / "x.jsonl"), "--kind", "sft"]) == 2
    assert "no usable records" in capsys.readouterr().err


def test_cli_as_module(tmp_path):
    src = write_verl(tmp_path / "t.parquet", [verl_row(0, "<image>\nq", "1", [image_bytes((0, 0, 0))])])
    proc = subprocess.run([sys.executable, "-m", "megatron_prism.data.importers", "verl-parquet", str(src),
                           str(tmp_path / "o.jsonl"), "--kind", "eval"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "imported 1 records" in proc.stdout and "no records skipped" in proc.stdout
