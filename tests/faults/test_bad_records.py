"""Bad records from outside (a missing image under a directory whose name contains "JSONL", a
corrupt PNG): counted once, by the right reason, the counts carried across a resume; in strict
mode a bad image stops the run when the split is opened, naming the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_prism.data.errors import RecordError
from megatron_prism.data.loader import load_split
from megatron_prism.data.records import SkipCounter, reason_of


def _split(root: Path) -> Path:
    root.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "good.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    rows = [{"id": "ok", "images": ["good.png"], "prompt": "<image>\nWhat colour?", "response": "red"},
            {"id": "gone", "images": ["missing.png"], "prompt": "<image>\nWhat colour?", "response": "red"},
            {"id": "bad", "images": ["corrupt.png"], "prompt": "<image>\nWhat colour?", "response": "red"}]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_missing_image_is_counted_as_missing_image_not_json(tmp_path):
    root = _split(tmp_path / "JSONL_exports" / "sft")
    records, skips = load_split(root, "sft")
    assert [r.id for r in records] == ["ok", "bad"]  # the corrupt image is only found when decoded
    assert dict(skips.counts) == {"missing image": 1}


def test_a_bad_record_is_counted_once_and_the_count_survives_a_resume():
    skips = SkipCounter()
    err = RecordError("/d/JSONL/x.jsonl:3: image /d/img.png cannot be decoded (truncated); replace or drop it")
    assert reason_of(err) == "bad image"
    for _epoch in range(3):  # the same record comes up every epoch
        skips.skip(reason_of(err), str(err), key="rec-3")
    assert dict(skips.counts) == {"bad image": 1}
    resumed = SkipCounter()
    resumed.load_state_dict(json.loads(json.dumps(skips.state_dict())))  # through the trainer state's JSON
    resumed.skip(reason_of(err), str(err), key="rec-3")
    assert dict(resumed.counts) == {"bad image": 1} and resumed.total == 1


def test_strict_mode_checks_every_image_when_the_split_opens(tmp_path):
    root = _split(tmp_path / "sft")
    lines = (root / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")  # no missing file: only the corrupt PNG
    with pytest.raises(RecordError, match=r"train.jsonl:2: image .*corrupt.png cannot be decoded"):
        load_split(root, "sft", strict=True)
