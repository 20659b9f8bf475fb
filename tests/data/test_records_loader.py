"""Record reading (every kind of bad input), and the sharded, resumable loader."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_prism.data.loader import ShardedLoader, load_split
from megatron_prism.data.records import Record, RecordError, SkipCounter, read_records, write_jsonl


@pytest.fixture
def data_dir(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    return tmp_path


GOOD = {"id": "g1", "images": ["ok.png"], "prompt": "<image>\nhow many?", "response": "<answer>1</answer>",
        "answer": "1", "source": "synth", "meta": {"k": 1}}
BAD_LINES = [
    ("malformed JSON", b'{"id": "x", "prompt": '),
    ("not UTF-8", b'{"id": "x", "prompt": "\xff\xfe", "response": "r"}'),
    ("does not exist", json.dumps({"id": "x", "images": ["nope.png"], "prompt": "<image>", "response": "r"}).encode()),
    ("non-empty 'response'", json.dumps({"id": "x", "prompt": "p", "response": "  "}).encode()),
    ("1 <image> markers but 0 images", json.dumps({"id": "x", "prompt": "<image>", "response": "r"}).encode()),
    ("unknown field", json.dumps({"id": "x", "prompt": "p", "response": "r", "extra": 1}).encode()),
    ("exactly one of 'prompt'", json.dumps({"id": "x", "response": "r"}).encode()),
]


def _write(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("message,line", BAD_LINES, ids=[m for m, _ in BAD_LINES])
def test_strict_errors_name_file_and_line(data_dir, message, line):
    path = _write(data_dir / "d.jsonl", [json.dumps(GOOD).encode(), line])
    with pytest.raises(RecordError) as err:
        list(read_records(path, "sft", strict=True))
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_lenient_mode_counts_every_skip(data_dir):
    path = _write(data_dir / "d.jsonl", [json.dumps(GOOD).encode(), b""] + [line for _, line in BAD_LINES])
    skips = SkipCounter()
    records = list(read_records(path, "sft", skips=skips))
    assert [r.id for r in records] == ["g1"]
    assert skips.total == len(BAD_LINES)
    assert "7 records skipped" in skips.summary()
    assert records[0].images[0].path == data_dir / "ok.png" and records[0].meta == {"k": 1}


def test_kind_decides_required_fields(data_dir):
    path = _write(data_dir / "d.jsonl", [json.dumps({"id": 1, "prompt": "p", "response": "r"}).encode()])
    assert len(list(read_records(path, "sft", strict=True))) == 1
    with pytest.raises(RecordError, match="rl records need a non-empty 'answer'"):
        list(read_records(path, "rl", strict=True))


def test_jsonl_round_trip_and_parquet_with_inline_images(data_dir):
    records = list(read_records(_write(data_dir / "d.jsonl", [json.dumps(GOOD).encode()]), "sft", strict=True))
    out = write_jsonl(records, data_dir / "copy.jsonl")
    again = list(read_records(out, "sft", strict=True))
    assert again[0].to_json() == records[0].to_json()

    png = (data_dir / "ok.png").read_bytes()
    table = pa.table({"id": ["p1", "p2"], "prompt": ["<image>q", "q"], "answer": ["3", None],
                      "images": [[{"bytes": png}], []]})
    pq.write_table(table, data_dir / "d.parquet")
    skips = SkipCounter()
    rows = list(read_records(data_dir / "d.parquet", "rl", skips=skips))
    assert [r.id for r in rows] == ["p1"] and rows[0].images[0].data == png
    assert skips.total == 1 and "row 2" in skips.examples["empty field"][0]


def test_load_split_reads_a_directory(data_dir):
    (data_dir / "split").mkdir()
    write_jsonl([Record(id=f"r{i}", prompt="p", answer=str(i)) for i in range(3)], data_dir / "split" / "a.jsonl")
    records, skips = load_split(data_dir / "split", "eval", strict=True)
    assert [r.answer for r in records] == ["0", "1", "2"] and skips.total == 0


def test_loader_is_deterministic_sharded_and_resumable():
    items = list(range(23))
    loaders = [ShardedLoader(items, 6, seed=5, dp_rank=r, dp_size=3) for r in range(3)]
    for step in range(9):  # crosses two epoch boundaries (3 batches of 6 per epoch)
        shares = [l.next_batch() for l in loaders]
        union = sorted(x for s in shares for x in s)
        assert len(union) == 6 and len(set(union)) == 6  # the ranks partition the global batch
    assert loaders[0].epoch == 2

    a = ShardedLoader(items, 4, seed=9)
    first = [a.next_batch() for _ in range(7)]
    b = ShardedLoader(items, 4, seed=9)
    assert [b.next_batch() for _ in range(7)] == first  # same seed, same order
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    c = ShardedLoader(items, 4, seed=9)
    c.load_state_dict(state)
    assert [c.next_batch() for _ in range(5)] == expected  # resume continues exactly
    assert ShardedLoader(items, 4, seed=10).next_batch() != first[0]
    with pytest.raises(ValueError, match="resuming would change the data order"):
        ShardedLoader(items, 4, seed=10).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of the data-parallel size"):
        ShardedLoader(items, 5, seed=1, dp_size=2)
