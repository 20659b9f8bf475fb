"""Bring your own data: the layouts people already have load directly (chat turns with a trailing
assistant turn, OpenAI content parts, no ids, JSON lists, verl's Parquet), and what needs
converting is named in the loader's error and converted by ``prism import``, relative paths
included."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_prism.data.chat import demonstration, render_prompt
from megatron_prism.data.importers import import_records, main
from megatron_prism.data.records import RecordError, SkipCounter, read_records


def _png(color=(200, 10, 10), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_messages_with_a_trailing_assistant_turn_are_an_sft_record(tmp_path):
    rows = [{"id": "m1", "messages": [{"role": "user", "content": "What is 2+2?"},
                                      {"role": "assistant", "content": "<answer>4</answer>"}]},
            {"id": "m2", "messages": [{"role": "system", "content": "Be terse."},
                                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                      {"role": "user", "content": "Sum 1+1?"},
                                      {"role": "assistant", "content": "<answer>2</answer>"}]}]
    one, two = read_records(_jsonl(tmp_path / "sft.jsonl", rows), "sft", strict=True)
    assert one.response == "<answer>4</answer>" and [m["role"] for m in one.messages] == ["user"]
    assert demonstration(one) == "<answer>4</answer>"
    assert [m["role"] for m in two.messages] == ["system", "user", "assistant", "user"]
    assert render_prompt(two).endswith("<|im_start|>user\nSum 1+1?<|im_end|>\n<|im_start|>assistant\n")
    # an assistant turn alone is nothing to prompt with
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": "b", "messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(RecordError, match=r"bad.jsonl:1: 'messages' has no user turn"):
        list(read_records(bad, "sft", strict=True))


def test_openai_content_parts_carry_text_and_images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (5, 5), (0, 90, 0)).save(tmp_path / "img" / "g.png")
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    row = {"id": "p1", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "and "}, {"type": "image", "image": "img/g.png"},
                                     {"type": "text", "text": "which is greener?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>second</answer>"}]}]}
    (rec,) = read_records(_jsonl(tmp_path / "d.jsonl", [row]), "sft", strict=True)
    assert rec.messages == [{"role": "user", "content": "<image>and <image>which is greener?"}]
    assert rec.response == "<answer>second</answer>"
    first, second = rec.images
    assert first.data == _png() and second.path == tmp_path / "img" / "g.png"
    assert render_prompt(rec).count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    remote = {"id": "r", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}], "response": "r"}
    with pytest.raises(RecordError, match="is a remote URL; download the images"):
        list(read_records(_jsonl(tmp_path / "r.jsonl", [remote]), "sft", strict=True))


def test_records_without_id_get_a_stable_id_from_their_content(tmp_path):
    rows = [{"prompt": "q1", "response": "a"}, {"prompt": "q2", "response": "a"}, {"prompt": "q1", "response": "a"}]
    path = _jsonl(tmp_path / "noid.jsonl", rows)
    ids = [r.id for r in read_records(path, "sft", strict=True)]
    assert ids[0] == ids[2] != ids[1] and all(i.startswith("auto-") for i in ids)
    assert ids == [r.id for r in read_records(path, "sft", strict=True)]  # the same on every read


def test_a_json_list_file_is_read_like_jsonl(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    items = [{"id": "j1", "prompt": "<image>\nhow many?", "images": ["a.png"], "answer": "3"},
             {"id": "j2", "prompt": "q", "answer": ""}]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(items, indent=2))
    skips = SkipCounter()
    (rec,) = read_records(path, "eval", skips=skips)
    assert rec.id == "j1" and rec.images[0].path == tmp_path / "a.png" and skips.counts == {"empty field": 1}
    with pytest.raises(RecordError, match=r"eval.json:item 2: eval records need a non-empty 'answer'"):
        list(read_records(path, "eval", strict=True))
    (tmp_path / "broken.json").write_text("[{\"id\": ")
    with pytest.raises(RecordError, match="not a readable JSON list of records"):
        list(read_records(tmp_path / "broken.json", "eval"))
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name
    lines.write_text(json.dumps(items[0]) + "\n")
    assert [r.id for r in read_records(lines, "eval", strict=True)] == ["j1"]


def _verl_rows() -> list[dict]:
    return [{"data_source": "geo3k", "prompt": [{"role": "user", "content": "<image>\nFind x."}],
             "images": [{"bytes": _png(), "path": None}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": "4"}, "extra_info": {"index": 7, "split": "train"},
             "teacher_response": None},
            {"data_source": "geo3k", "prompt": [{"role": "system", "content": "S"},
                                                {"role": "user", "content": "<image>\nArea?"}],
             "images": [{"bytes": _png((0, 0, 9)), "path": None}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": "12"}, "extra_info": {"index": 8},
             "teacher_response": "<caption>c</caption><think>t</think><answer>12</answer>"}]


def test_verl_parquet_columns_load_directly(tmp_path):
    path = tmp_path / "rl" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(_verl_rows()), path)
    first, second = read_records(path, "rl", strict=True)
    assert (first.id, first.answer, first.source, first.prompt) == ("geo3k-7", "4", "geo3k", "<image>\nFind x.")
    assert first.images[0].data == _png() and first.meta["extra_info"]["split"] == "train"
    assert second.meta["system_prompt"] == "S" and second.prompt == "<image>\nArea?"
    # alignment needs a demonstration: only the row with PRISM's teacher response has one
    skips = SkipCounter()
    (align,) = read_records(path, "align", skips=skips)
    assert align.response.endswith("<answer>12</answer>") and skips.counts == {"empty field": 1}


@pytest.mark.parametrize("row,layout", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"instruction": "q", "input": "", "output": "a"}, "llamafactory"),
    ({"data_source": "x", "prompt": "q", "reward_model": {"ground_truth": "1"}}, "verl"),
])
def test_an_unknown_layout_names_its_importer(tmp_path, row, layout):
    path = _jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(RecordError) as err:
        list(read_records(path, "sft", strict=True))
    assert f"{path}:1: unknown field(s)" in str(err.value)
    assert f"this looks like a {layout} row: convert the file with `prism import {layout} IN OUT --kind sft`" \
        in str(err.value)


def test_llamafactory_alpaca_rows_with_history_and_system(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "i.png")
    rows = [{"instruction": "<image>What colour?", "input": "Answer in one word.", "output": "<answer>black</answer>",
             "system": "Sys", "history": [["Hello", "Hi there"]], "images": ["i.png"]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # sharegpt rows too
            {"instruction": "", "output": "x"}]
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(rows))
    skips = SkipCounter()
    one, two = import_records("llamafactory", src, tmp_path / "out" / "sft.jsonl", "sft", skips=skips)
    assert one.messages == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
                            {"role": "user", "content": "<image>What colour?\nAnswer in one word."}]
    assert one.response == "<answer>black</answer>" and one.meta["system_prompt"] == "Sys"
    assert one.images[0].path == (tmp_path / "i.png").resolve()
    assert two.prompt == "q" and two.response == "a" and skips.total == 1
    back = list(read_records(tmp_path / "out" / "sft.jsonl", "sft", strict=True))
    assert [r.messages or r.prompt for r in back] == [one.messages, "q"]


def test_relative_paths_work_for_import_and_load(tmp_path, monkeypatch):
    """``prism import sharegpt sft/data.json out/sft.jsonl`` from the data's parent folder: the image
    folder was joined twice (sft/sft/ok.png), so every row was dropped."""
    (tmp_path / "sft" / "imgs").mkdir(parents=True)
    Image.new("RGB", (4, 4), (7, 7, 7)).save(tmp_path / "sft" / "imgs" / "ok.png")
    (tmp_path / "sft" / "data.json").write_text(json.dumps([
        {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
         "images": ["imgs/ok.png"]}]))
    monkeypatch.chdir(tmp_path)
    assert main(["sharegpt", "sft/data.json", "out/sft.jsonl", "--kind", "sft", "--strict"]) == 0
    (rec,) = read_records(Path("out/sft.jsonl"), "sft", strict=True)  # a relative data path
    assert rec.images[0].path.resolve() == (tmp_path / "sft" / "imgs" / "ok.png").resolve()
    assert json.loads(Path("out/sft.jsonl").read_text())["images"] == ["../sft/imgs/ok.png"]
    assert main(["sharegpt", "sft/data.json", "out/b.jsonl", "--kind", "sft", "--image-root", "sft"]) == 0
    (tmp_path / "rl").mkdir()
    pq.write_table(pa.Table.from_pylist(_verl_rows()), tmp_path / "rl" / "t.parquet")
    assert main(["verl", "rl/t.parquet", "rl2/t.jsonl", "--kind", "rl"]) == 0
    assert [r.id for r in read_records(Path("rl2/t.jsonl"), "rl", strict=True)] == ["geo3k-7", "geo3k-8"]
