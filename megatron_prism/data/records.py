"""The one record format of every stage, and its readers (JSONL, JSON lists, Parquet).

A record is one multimodal example::

    {"id": "geo-17", "images": ["img/17.png"], "prompt": "<image>\\nWhat is x?",
     "response": "<caption>...</caption><think>...</think><answer>4</answer>",
     "answer": "4", "source": "geo3k", "meta": {...}}

* ``images``: paths relative to the data file (absolute paths also accepted), or, in Parquet,
  inline encoded bytes (PNG/JPEG; the HF datasets ``{"bytes", "path"}`` struct). Resolved paths are
  stored absolute.
* ``prompt`` (text; ``<image>`` marks where each image goes, in order; without any marker the
  images go before the text, as Qwen-VL chat does) or ``messages`` (chat form: a list of
  ``{"role": "system"|"user"|"assistant", "content": ...}``, the content text with ``<image>``
  markers or OpenAI-style content parts). A trailing assistant turn is the ``response``.
* ``response``: a demonstration (SFT and alignment splits); ``answer``: the verifiable ground truth
  (RL and evaluation splits); ``source``: dataset of origin; ``meta``: anything else, kept as is.
* ``id``: optional; a record without one gets a stable id derived from its content.

A ``.json`` file may hold a list of records; a Parquet file in verl's RL layout is mapped as it is
read. Other layouts (ShareGPT / LLaMA-Factory) are converted once with ``prism import``, which the
loader's errors name when a row looks like one of them.

Which fields a split needs is given by ``REQUIRED_BY_KIND``. Bad input is either an error
(``strict=True``: :class:`RecordError` naming the file, the line and the fix) or, in the default
lenient mode, a skip counted by reason in a :class:`SkipCounter` and logged, whose counts the stage
report prints. Nothing is silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_prism.data import layouts
from megatron_prism.data.errors import RecordError

log = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
SplitKind = Literal["sft", "align", "rl", "eval"]
REQUIRED_BY_KIND: dict[str, tuple[str, ...]] = {
    "sft": ("response",),
    "align": ("response",),
    "rl": ("answer",),
    "eval": ("answer",),
}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # what a split folder's record files end with
KNOWN_FIELDS = {"id", "images", "prompt", "messages", "response", "answer", "source", "meta"}


@dataclass
class ImageRef:
    """An image of a record: a file path, or encoded bytes (Parquet)."""

    path: Path | None = None
    data: bytes | None = None

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"<{len(self.data or b'')} inline bytes>"


@dataclass
class Record:
    id: str
    images: list[ImageRef] = field(default_factory=list)
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    response: str | None = None
    answer: str | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # "file:line", for messages

    def user_text(self) -> str:
        """The prompt text (the last user turn in chat form)."""
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages or [] if m.get("role") == "user"]
        return users[-1] if users else ""

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        """Plain dict for JSONL (image paths relative to ``relative_to`` when given)."""
        out: dict[str, Any] = {"id": self.id}
        if self.images:
            paths = []
            for img in self.images:
                if img.path is None:
                    raise RecordError(f"{self.origin or self.id}: inline image bytes cannot be written to JSONL")
                # relpath, not Path.relative_to: images may live outside the JSONL's directory
                paths.append(os.path.relpath(img.path, relative_to) if relative_to else str(img.path))
            out["images"] = paths
        for key in ("prompt", "messages", "response", "answer", "source"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass
class SkipCounter:
    """Counts skipped records by reason (lenient mode); logs the first few of each reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    log_first: int = 3

    # Records already counted (by key, e.g. a record id): a record whose image cannot be decoded
    # comes up again every epoch but is one skipped record.
    seen_keys: set[str] = field(default_factory=set)

    def skip(self, reason: str, message: str, *, key: str | None = None) -> None:
        if key is not None:
            if key in self.seen_keys:
                return
            self.seen_keys.add(key)
        self.counts[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self.log_first:
            seen.append(message)
            log.warning("skipping record: %s", message)

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint's trainer state: a resumed stage goes on counting from here."""
        return {"counts": dict(self.counts), "keys": sorted(self.seen_keys)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Replaces the counts (those of reading the files are the same in every process)."""
        if state:
            self.counts = Counter(state.get("counts", {}))
            self.seen_keys = set(state.get("keys", []))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no records skipped"
        return f"{self.total} records skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(self.counts.items()))


def _check_text(value: Any, key: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def parse_record(obj: Any, *, kind: SplitKind, base_dir: Path, where: str) -> Record:
    """Validates one decoded JSON object (or Parquet row) into a :class:`Record`.

    Common chat layouts are accepted as they are: ``messages`` whose last turn is the assistant's
    (that turn is the ``response``), content given as OpenAI-style parts (see ``data.layouts``),
    ``prompt`` given as a message list (verl), and no ``id`` (one is derived from the content)."""
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - KNOWN_FIELDS
    if unknown:
        layout = layouts.importer_for(set(obj))
        fix = (f"this looks like a {layout} row: convert the file with `prism import {layout} IN OUT --kind {kind}`"
               if layout else "put anything else under 'meta', or convert the file with `prism import "
               "sharegpt|llamafactory|verl IN OUT`")
        raise RecordError(f"{where}: unknown field(s) {sorted(unknown)}; records have {sorted(KNOWN_FIELDS)}; {fix}")
    prompt = obj.get("prompt")
    messages = obj.get("messages")
    if isinstance(prompt, list) and messages is None:  # verl writes the chat turns under 'prompt'
        prompt, messages = None, prompt
    prompt = _check_text(prompt, "prompt", where)
    if (prompt is None) == (messages is None):
        raise RecordError(f"{where}: give exactly one of 'prompt' (text) or 'messages' (chat turns)")
    part_images: list[Any] = []
    response = obj.get("response")
    if messages is not None:
        try:
            messages = layouts.chat_turns(messages, where, images=part_images)
        except RecordError as err:
            raise RecordError(f"{err}; 'messages' is a list of {{'role': system|user|assistant, 'content': text or "
                              "content parts}") from None
        if response is None and len(messages) > 1 and messages[-1]["role"] == "assistant":
            response = messages.pop()["content"]  # the trailing assistant turn is the demonstration
        if not any(m["role"] == "user" for m in messages):
            raise RecordError(f"{where}: 'messages' has no user turn to prompt with")
    rid = obj.get("id")
    if rid is None:
        rid = layouts.content_id({k: v for k, v in obj.items() if k != "meta"})
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
        raise RecordError(f"{where}: 'id' must be a non-empty string (or left out: one is derived from the content)")
    images: list[ImageRef] = []
    raw_images = obj.get("images") or []
    for item in [*([raw_images] if isinstance(raw_images, str) else raw_images), *part_images]:
        if isinstance(item, str):
            path = Path(item)
            images.append(ImageRef(path=path if path.is_absolute() else (base_dir / path)))
        elif isinstance(item, (bytes, bytearray)):
            images.append(ImageRef(data=bytes(item)))
        elif isinstance(item, dict) and isinstance(item.get("bytes"), (bytes, bytearray)) and item["bytes"]:
            images.append(ImageRef(data=bytes(item["bytes"])))  # the HF datasets Image layout
        elif isinstance(item, dict) and isinstance(item.get("base64"), str):
            images.append(ImageRef(data=layouts.decode_base64(item["base64"], where)))
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
            path = Path(item["path"])  # the HF datasets Image layout without bytes
            images.append(ImageRef(path=path if path.is_absolute() else (base_dir / path)))
        else:
            raise RecordError(f"{where}: an image must be a path, bytes, or {{'bytes': ...}}; got {type(item).__name__}")
    record = Record(
        id=str(rid), images=images, prompt=prompt, messages=messages,
        response=_check_text(response, "response", where),
        answer=_check_text(obj.get("answer") if not isinstance(obj.get("answer"), (int, float)) else str(obj["answer"]),
                           "answer", where),
        source=_check_text(obj.get("source"), "source", where),
        meta=obj.get("meta") or {}, origin=where,
    )
    for key in REQUIRED_BY_KIND[kind]:
        value = getattr(record, key)
        if value is None or not value.strip():
            raise RecordError(f"{where}: {kind} records need a non-empty {key!r}")
    markers = sum(t.count(IMAGE_MARKER) for t in ([prompt] if prompt else [m["content"] for m in messages or []]))
    if markers and markers != len(images):
        raise RecordError(f"{where}: {markers} {IMAGE_MARKER} markers but {len(images)} images")
    for img in images:
        if img.path is not None and not img.path.is_file():
            raise RecordError(f"{where}: image {img.path} does not exist (relative paths are relative to the data file)")
    return record


# (phrase of the message, reason): the most specific first. Matched on the message's own words,
# never on the file name a message starts with (a path may well contain "JSON").
_REASONS = (("does not exist", "missing image"), ("cannot be decoded", "bad image"), ("not UTF-8", "UTF-8"),
            ("malformed JSON", "JSON"), ("non-empty", "empty field"), ("markers", "image count"),
            ("unknown field", "unknown field"), ("'id' must", "bad id"))


def reason_of(err: RecordError) -> str:
    """The skip reason of a record error, from the message's own words."""
    return _reason(err)


def _reason(err: RecordError) -> str:
    text = str(err)
    where, sep, rest = text.partition(": ")
    body = rest if sep else text
    return next((reason for phrase, reason in _REASONS if phrase in body), "invalid record")


def read_jsonl(path: str | Path, kind: SplitKind, *, strict: bool = False,
               skips: SkipCounter | None = None) -> Iterator[Record]:
    """Records of a JSONL file, in order. Blank lines are ignored."""
    path = Path(path)
    skips = skips if skips is not None else SkipCounter()
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path}:{number}"
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise RecordError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                      "re-encode the file as UTF-8") from None
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise RecordError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                yield parse_record(obj, kind=kind, base_dir=path.parent, where=where)
            except RecordError as err:
                if strict:
                    raise
                skips.skip(_reason(err), str(err))


def read_json(path: str | Path, kind: SplitKind, *, strict: bool = False,
              skips: SkipCounter | None = None) -> Iterator[Record]:
    """Records of a ``.json`` file: a JSON list of records (LLaMA-Factory, HF ``to_json``), or
    JSON Lines under a ``.json`` name."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from read_jsonl(path, kind, strict=strict, skips=skips)
        return
    skips = skips if skips is not None else SkipCounter()
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # the whole file is one value: nothing in it can be read, lenient or not
        raise RecordError(f"{path}: not a readable JSON list of records ({exc}); fix the file or write it as "
                          "JSON Lines (one record per line)") from None
    for number, obj in enumerate(items, start=1):
        try:
            yield parse_record(obj, kind=kind, base_dir=path.parent, where=f"{path}:item {number}")
        except RecordError as err:
            if strict:
                raise
            skips.skip(_reason(err), str(err))


def read_parquet(path: str | Path, kind: SplitKind, *, strict: bool = False,
                 skips: SkipCounter | None = None) -> Iterator[Record]:
    """Records of a Parquet file (images as inline bytes or paths), in row order. A file in verl's
    RL layout (``prompt`` messages, ``reward_model``, ``data_source``, ...) is mapped as it is read
    (``data.layouts.verl_record``)."""
    import pyarrow.parquet as pq

    path = Path(path)
    skips = skips if skips is not None else SkipCounter()
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise RecordError(f"{path}: not a readable Parquet file ({exc})") from None
    verl = "reward_model" in table.schema_arrow.names or "data_source" in table.schema_arrow.names
    row = 0
    for batch in table.iter_batches(batch_size=256):
        for obj in batch.to_pylist():
            row += 1
            where = f"{path}:row {row}"
            try:
                if verl:
                    obj = layouts.verl_record(obj, where, image_root=path.parent)
                obj = {k: v for k, v in obj.items() if v is not None}
                if isinstance(obj.get("meta"), str):
                    try:
                        obj["meta"] = json.loads(obj["meta"])
                    except json.JSONDecodeError as exc:
                        raise RecordError(f"{where}: 'meta' is not valid JSON ({exc.msg})") from None
                yield parse_record(obj, kind=kind, base_dir=path.parent, where=where)
            except RecordError as err:
                if strict:
                    raise
                skips.skip(_reason(err), str(err))


def read_records(path: str | Path, kind: SplitKind, *, strict: bool = False,
                 skips: SkipCounter | None = None) -> Iterator[Record]:
    """JSONL, JSON (a list of records) or Parquet, by extension."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        return read_parquet(path, kind, strict=strict, skips=skips)
    if path.suffix == ".jsonl":
        return read_jsonl(path, kind, strict=strict, skips=skips)
    if path.suffix == ".json":
        return read_json(path, kind, strict=strict, skips=skips)
    raise RecordError(f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json or .parquet (other "
                      "layouts: `prism import sharegpt|llamafactory|verl IN OUT --kind KIND`)")


def write_jsonl(records: list[Record], path: str | Path) -> Path:
    """Writes records as JSONL with image paths relative to the file (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_json(relative_to=path.parent), ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
