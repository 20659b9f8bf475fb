"""Importers of PRISM's published training data into our record format (JSONL + PNG files).

Two layouts:

* ``verl-parquet``: verl's RL Parquet (``verl/examples/data_preprocess/geo3k.py``,
  ``rl_dataset.py`` in XIAO4579/PRISM; ``prism-vlm/rl_dataset``): ``prompt`` (chat messages
  ``[{"role", "content"}]``, ``<image>`` markers in the text), ``images`` (list of
  ``{"bytes", "path"}``), ``reward_model.ground_truth``, ``data_source``, ``ability``,
  ``extra_info``; alignment rows also carry ``teacher_response`` (and ``teacher_caption`` /
  ``teacher_cot``). Records get ``answer`` = ground truth, ``source`` = data_source and, when a
  teacher response is there, ``response`` = it (what the ``sft``/``align`` kinds need). Inline
  image bytes are re-encoded as PNG files in ``<OUT stem>_images/`` next to the output JSONL.
* ``sharegpt``: LLaMA-Factory's multimodal ShareGPT JSON/JSONL (``prism-vlm/gemini_distill``):
  ``messages`` (``role``/``content``) or ``conversations`` (``from``/``value``: human, gpt,
  system), optional ``system``, ``images`` (paths relative to the file, or ``--image-root``).
  ``response`` = the final assistant turn; the turns before it are the prompt.

System prompts are **dropped** from the turns and kept in ``meta["system_prompt"]``: our chat
renderer adds PRISM's system prompt (``chat.PRISM_SYSTEM_PROMPT``) to every prompt that has none,
so one config decides the system turn of every stage. ``--keep-system`` keeps them in
``messages`` instead. A prompt of a single user turn becomes ``prompt``; longer ones ``messages``.

CLI: ``python -m megatron_prism.data.importers {verl-parquet,sharegpt} IN OUT.jsonl --kind KIND``.
Bad rows are skipped and counted (``--strict``: the first one is an error); unusable input
(missing file, wrong type, missing columns, nothing importable) exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_prism.data.records import (
    REQUIRED_BY_KIND,
    ImageRef,
    Record,
    RecordError,
    SkipCounter,
    SplitKind,
    parse_record,
    write_jsonl,
)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
VERL_COLUMNS = ("prompt", "reward_model")


def _content_text(content: Any, where: str) -> str:
    """A message content: a string, or a list of ``{"type": "text"|"image"}`` parts (-> ``<image>``)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(str(part.get("text") or ""))
            elif kind == "image":
                parts.append("<image>")
            else:
                raise RecordError(f"{where}: unknown message content part {part!r:.80}")
        return "".join(parts)
    raise RecordError(f"{where}: message content must be text, got {type(content).__name__}")


def _turns_to_fields(turns: list[dict[str, str]], *, keep_system: bool, where: str) -> dict[str, Any]:
    """``prompt`` (one user turn) or ``messages``, plus ``meta.system_prompt`` when dropped."""
    out: dict[str, Any] = {"meta": {}}
    system = [t["content"] for t in turns if t["role"] == "system"]
    if system and not keep_system:
        out["meta"]["system_prompt"] = "\n".join(system)
        turns = [t for t in turns if t["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise RecordError(f"{where}: the prompt turns must end with a user turn")
    if len(turns) == 1:
        out["prompt"] = turns[0]["content"]
    else:
        out["messages"] = turns
    return out


def _png(data: bytes, where: str) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            buf = io.BytesIO()
            (img if img.mode in ("RGB", "RGBA", "L", "LA", "P") else img.convert("RGB")).save(buf, format="PNG")
            return buf.getvalue()
    except (UnidentifiedImageError, OSError) as exc:
        raise RecordError(f"{where}: image bytes are not a readable image ({exc})") from None


# ------------------------------------------------------------------------------------------- verl

def _verl_row(row: dict[str, Any], number: int, *, file: Path, kind: SplitKind, keep_system: bool) -> Record:
    where = f"{file}:row {number}"
    prompt = row.get("prompt")
    if isinstance(prompt, str):  # some verl sets store the prompt as JSON text
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError:
            raise RecordError(f"{where}: 'prompt' is text but not a JSON message list") from None
    if not isinstance(prompt, list) or not prompt:
        raise RecordError(f"{where}: 'prompt' must be a non-empty list of chat messages")
    turns = []
    for msg in prompt:
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise RecordError(f"{where}: a prompt message needs role system/user/assistant, got {msg!r:.80}")
        turns.append({"role": msg["role"], "content": _content_text(msg.get("content"), where)})
    obj = _turns_to_fields(turns, keep_system=keep_system, where=where)
    reward_model = row.get("reward_model") or {}
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if isinstance(truth, (list, tuple)):
        obj["meta"]["ground_truths"] = [str(t) for t in truth]
        truth = truth[0] if truth else None
    if truth is not None and str(truth).strip():
        obj["answer"] = str(truth)
    if row.get("teacher_response"):
        obj["response"] = str(row["teacher_response"])
    images = []
    for item in row.get("images") or []:
        if isinstance(item, dict) and item.get("bytes"):
            images.append({"bytes": _png(bytes(item["bytes"]), where)})
        elif isinstance(item, dict) and item.get("path"):
            images.append(str(item["path"]))
        elif isinstance(item, str):
            images.append(item)
        else:
            raise RecordError(f"{where}: an image must be {{'bytes': ...}} or a path, got {type(item).__name__}")
    obj["images"] = images
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    source = str(row.get("data_source") or file.stem)
    index = extra.get("index", extra.get("id"))
    obj["id"] = f"{source}-{index}" if index is not None else f"{file.stem}-{number}"
    obj["source"] = source
    obj["meta"].update({k: row[k] for k in ("ability", "teacher_caption", "teacher_cot") if row.get(k) is not None})
    if isinstance(reward_model, dict) and reward_model.get("style"):
        obj["meta"]["reward_style"] = reward_model["style"]
    if extra:
        obj["meta"]["extra_info"] = extra
    return parse_record(obj, kind=kind, base_dir=file.parent, where=where)


def iter_verl_parquet(path: Path, kind: SplitKind, *, keep_system: bool = False) -> Iterator[Record | RecordError]:
    """Each row of a verl RL Parquet file as a Record (or the RecordError saying why not)."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise RecordError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in VERL_COLUMNS if c not in table.schema_arrow.names]
    if missing:
        raise RecordError(f"{path}: not verl's RL layout: no column(s) {missing} (has {table.schema_arrow.names})")
    number = 0
    for batch in table.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            number += 1
            try:
                yield _verl_row(row, number, file=path, kind=kind, keep_system=keep_system)
            except RecordError as err:
                yield err


# --------------------------------------------------------------------------------------- ShareGPT

def _sharegpt_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield f"{path}:{number}", RecordError(f"{path}:{number}: malformed JSON ({exc.msg})")
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, list):
        raise RecordError(f"{path}: a ShareGPT file is a JSON list of conversations, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        yield f"{path}:item {number}", row


def _sharegpt_row(row: Any, where: str, *, number: int, file: Path, kind: SplitKind, keep_system: bool,
                  image_root: Path) -> Record:
    if not isinstance(row, dict):
        raise RecordError(f"{where}: a conversation must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        raw, role_key, text_key = row["messages"], "role", "content"
    elif "conversations" in row:
        raw, role_key, text_key = row["conversations"], "from", "value"
    else:
        raise RecordError(f"{where}: no 'messages' or 'conversations' (has {sorted(row)})")
    if not isinstance(raw, list) or not raw:
        raise RecordError(f"{where}: the conversation must be a non-empty list of turns")
    turns = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
    for turn in raw:
        role = SHAREGPT_ROLES.get(turn.get(role_key)) if isinstance(turn, dict) else None
        if role is None:
            raise RecordError(f"{where}: unsupported turn {turn!r:.80} (roles: {sorted(SHAREGPT_ROLES)})")
        turns.append({"role": role, "content": _content_text(turn.get(text_key), where)})
    response = None
    if turns[-1]["role"] == "assistant":
        response = turns.pop()["content"]
    obj = _turns_to_fields(turns, keep_system=keep_system, where=where)
    if response is not None:
        obj["response"] = response
    for key in ("answer", "ground_truth"):
        if row.get(key) is not None and "answer" not in obj:
            obj["answer"] = str(row[key])
    images = row.get("images") or []
    if isinstance(images, str):
        images = [images]
    obj["images"] = [str(p if Path(p).is_absolute() else (image_root / p)) for p in images]
    obj["id"] = str(row.get("id") or f"{file.stem}-{number}")
    if row.get("source") is not None:
        obj["source"] = str(row["source"])
    return parse_record(obj, kind=kind, base_dir=image_root, where=where)


def iter_sharegpt(path: Path, kind: SplitKind, *, keep_system: bool = False,
                  image_root: Path | None = None) -> Iterator[Record | RecordError]:
    """Each conversation of a ShareGPT / LLaMA-Factory JSON or JSONL file as a Record (or its error)."""
    root = image_root if image_root is not None else path.parent
    for number, (where, row) in enumerate(_sharegpt_rows(path), start=1):
        if isinstance(row, RecordError):
            yield row
            continue
        try:
            yield _sharegpt_row(row, where, number=number, file=path, kind=kind, keep_system=keep_system,
                                image_root=root)
        except RecordError as err:
            yield err


# --------------------------------------------------------------------------------------- writing

def _reason(err: RecordError) -> str:
    text = str(err)
    for key, reason in (("does not exist", "missing image"), ("readable image", "bad image"),
                        ("non-empty", "empty field"), ("markers", "image count"), ("JSON", "malformed JSON"),
                        ("turn", "bad turns"), ("prompt", "bad prompt"), ("duplicate", "duplicate id")):
        if key in text:
            return reason
    return "invalid record"


def import_records(fmt: str, src: str | Path, out: str | Path, kind: SplitKind, *, strict: bool = False,
                   keep_system: bool = False, image_root: str | Path | None = None,
                   skips: SkipCounter | None = None) -> list[Record]:
    """Converts ``src`` (layout ``fmt``) into records written to ``out`` (JSONL); returns them.

    Inline images are written as PNG files in ``<out stem>_images/``; image paths in the JSONL are
    relative to it. Raises :class:`RecordError` on unusable input (and on the first bad row when
    ``strict``); otherwise bad rows are counted in ``skips``.
    """
    src, out = Path(src), Path(out)
    skips = skips if skips is not None else SkipCounter()
    if kind not in REQUIRED_BY_KIND:
        raise RecordError(f"unknown kind {kind!r}; use one of {sorted(REQUIRED_BY_KIND)}")
    if not src.is_file():
        raise RecordError(f"{src}: no such input file")
    if fmt == "verl-parquet":
        if src.suffix != ".parquet":
            raise RecordError(f"{src}: verl-parquet input must be a .parquet file")
        rows = iter_verl_parquet(src, kind, keep_system=keep_system)
    elif fmt == "sharegpt":
        if src.suffix not in (".json", ".jsonl"):
            raise RecordError(f"{src}: sharegpt input must be a .json or .jsonl file")
        rows = iter_sharegpt(src, kind, keep_system=keep_system, image_root=Path(image_root) if image_root else None)
    else:
        raise RecordError(f"unknown input layout {fmt!r}; use verl-parquet or sharegpt")
    records: list[Record] = []
    seen: set[str] = set()
    for item in rows:
        if isinstance(item, Record) and item.id in seen:
            item = RecordError(f"{item.origin}: duplicate id {item.id!r}")
        if isinstance(item, RecordError):
            if strict:
                raise item
            skips.skip(_reason(item), str(item))
            continue
        seen.add(item.id)
        records.append(item)
    if not records:
        raise RecordError(f"{src}: no usable records ({skips.summary()})")
    out.parent.mkdir(parents=True, exist_ok=True)
    _materialize_images(records, out.parent / f"{out.stem}_images")
    save_records(records, out)
    return records


def _materialize_images(records: list[Record], folder: Path) -> None:
    """Writes inline image bytes (already PNG) to ``folder`` and points the records at the files."""
    for rec in records:
        for i, img in enumerate(rec.images):
            if img.data is not None:
                folder.mkdir(parents=True, exist_ok=True)
                name = "".join(c if c.isalnum() or c in "-_." else "_" for c in rec.id)
                path = folder / f"{name}_{i}.png"
                path.write_bytes(img.data)
                rec.images[i] = ImageRef(path=path.resolve())


def save_records(records: list[Record], out: Path) -> Path:
    """JSONL with image paths relative to ``out``'s folder (``../`` where images live outside it)."""
    base = out.parent.resolve()
    if all(img.path is not None and img.path.resolve().is_relative_to(base) for r in records for img in r.images):
        for rec in records:
            rec.images = [ImageRef(path=img.path.resolve()) for img in rec.images]
        return write_jsonl(records, out)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            obj = rec.to_json()
            if "images" in obj:
                obj["images"] = [os.path.relpath(Path(p).resolve(), base) for p in obj["images"]]
            fh.write(json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_prism.data.importers",
                                     description="Import PRISM's published data layouts as record JSONL.")
    parser.add_argument("layout", choices=["verl-parquet", "sharegpt"])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path, help="output .jsonl (images go to <stem>_images/ beside it)")
    parser.add_argument("--kind", required=True, choices=sorted(REQUIRED_BY_KIND))
    parser.add_argument("--strict", action="store_true", help="the first bad row is an error")
    parser.add_argument("--keep-system", action="store_true", help="keep system turns in messages")
    parser.add_argument("--image-root", type=Path, help="folder ShareGPT image paths are relative to")
    args = parser.parse_args(argv)
    if args.output.suffix != ".jsonl":
        print(f"error: {args.output}: the output must be a .jsonl file", file=sys.stderr)
        return 2
    skips = SkipCounter()
    try:
        records = import_records(args.layout, args.input, args.output, args.kind, strict=args.strict,
                                 keep_system=args.keep_system, image_root=args.image_root, skips=skips)
    except RecordError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line
        return 2
    print(f"imported {len(records)} records to {args.output}; {skips.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
