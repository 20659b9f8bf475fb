"""Bad records from outside (a missing image under a directory whose name contains "JSONL", a
corrupt PNG): counted once, by the right reason, the counts carried across a resume; in strict
mode a bad image stops the run when the split is opened, naming the record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_prism.data.errors import RecordError
from megatron_prism.data.images import load_image
from megatron_prism.data.loader import ShardedLoader, load_split
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


def _deep_split(root: Path, *, missing_at: int | None, cut_at: int, rows: int = 400) -> Path:
    """``rows`` records over 8 good PNGs; at line ``cut_at`` a PNG cut short after its header and
    first chunks (a file copied while being written), at ``missing_at`` an image that is not there."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        Image.new("RGB", (24, 24), (30 * i, 10, 200)).save(root / f"good{i}.png")
    Image.effect_noise((64, 64), 60).convert("RGB").save(root / "whole.png")
    data = (root / "whole.png").read_bytes()
    (root / "cut.png").write_bytes(data[:len(data) // 2])
    lines = []
    for number in range(1, rows + 1):
        image = "cut.png" if number == cut_at else "gone.png" if number == missing_at else f"good{number % 8}.png"
        lines.append(json.dumps({"id": f"r{number}", "images": [image], "prompt": "<image>\nColour?",
                                 "response": "blue"}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_strict_mode_stops_at_open_naming_the_record_and_the_fix(tmp_path, capsys):
    """Strict: a missing image deep in the file is the error when the split is read (the fields
    pass checks the file exists); once it is fixed, the truncated PNG further up is found by
    decoding every image at open, on 2 threads with a progress line, before anything trains."""
    root = _deep_split(tmp_path / "sft", missing_at=371, cut_at=233)
    with pytest.raises(RecordError) as err:
        load_split(root, "sft", strict=True)
    assert str(err.value) == (f"{root / 'train.jsonl'}:371: image {root / 'gone.png'} does not exist (relative "
                              "paths are relative to the data file)")
    _deep_split(root, missing_at=None, cut_at=233)  # the operator restores the missing image's record
    with pytest.raises(RecordError) as err:
        load_split(root, "sft", strict=True, image_check_workers=2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{root / 'train.jsonl'}:233: image {root / 'cut.png'} cannot be decoded (")
    assert "truncated" in message and "replace or drop it" in message and "data.lenient=true" in message
    progress = [ln for ln in capsys.readouterr().err.splitlines() if "images decoded" in ln]
    assert progress and all(ln.startswith(f"[prism] {root}: images decoded: ") for ln in progress)
    assert not progress[-1].endswith(" 400/400 images")  # it stopped at the bad image

    (root / "cut.png").write_bytes((root / "whole.png").read_bytes())
    records, skips = load_split(root, "sft", strict=True, image_check_workers=3)
    assert len(records) == 400 and skips.total == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"[prism] {root}: images decoded: 400/400 images"


def test_lenient_mode_counts_each_bad_record_once_over_epochs(tmp_path):
    """Lenient: the missing image is one skip when the split is read; the truncated PNG one skip
    when its batch comes up, however many epochs bring it back (the stages' batch-time path)."""
    root = _deep_split(tmp_path / "sft", missing_at=371, cut_at=233)
    records, skips = load_split(root, "sft")
    assert len(records) == 399 and dict(skips.counts) == {"missing image": 1}
    loader = ShardedLoader(records, 50, seed=3)
    seen = 0
    for _ in range(3 * loader.batches_per_epoch):  # three epochs
        for record in loader.next_batch():
            seen += record.id == "r233"
            try:
                for ref in record.images:
                    load_image(ref, record.origin)
            except RecordError as exc:
                skips.skip(reason_of(exc), str(exc), key=record.id)
    assert loader.epoch == 2 and seen >= 2  # it came up again, and was not counted again
    assert dict(skips.counts) == {"missing image": 1, "bad image": 1}
