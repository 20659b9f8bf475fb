"""``prism import``: convert the layouts other tools write into our record format (JSONL + PNG files).

Three layouts (the row mappings live in :mod:`megatron_prism.data.layouts`):

* ``verl``: verl's RL Parquet (``verl/examples/data_preprocess/geo3k.py``, ``rl_dataset.py`` in
  XIAO4579/PRISM; ``prism-vlm/rl_dataset``): ``prompt`` (chat messages, ``<image>`` markers),
  ``images`` (``{"bytes", "path"}``), ``reward_model.ground_truth``, ``data_source``, ``ability``,
  ``extra_info``; alignment rows also carry ``teacher_response`` (and ``teacher_caption`` /
  ``teacher_cot``). Records get ``answer`` = ground truth, ``source`` = data_source and, when a
  teacher response is there, ``response`` = it. The loader also reads such Parquet files directly;
  importing writes the images out once as PNG files in ``<OUT stem>_images/``.
* ``sharegpt``: ShareGPT / LLaMA-Factory ``sharegpt`` JSON or JSONL (``prism-vlm/gemini_distill``):
  ``messages`` (``role``/``content``) or ``conversations`` (``from``/``value``: human, gpt, system),
  optional ``system``, ``images`` (paths relative to the file, or to ``--image-root``).
* ``llamafactory``: LLaMA-Factory's ``alpaca`` format (``instruction``, ``input``, ``output``,
  ``system``, ``history``, ``images``); rows in its ``sharegpt`` format are read as well.

``response`` is the final assistant turn; the turns before it are the prompt. System prompts are
**dropped** into ``meta["system_prompt"]`` (``--keep-system`` keeps them): our chat renderer adds
PRISM's system prompt (``chat.PRISM_SYSTEM_PROMPT``) to every prompt that has none, so one setting
decides the system turn of every stage. A row without an id gets one derived from its content.

    prism import sharegpt data/gemini_distill.json data/mine/sft/part-0.jsonl --kind sft

Bad rows are skipped and counted (``--strict``: the first one is an error); unusable input (missing
file, wrong type, missing columns, nothing importable) exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megatron_prism.data import layouts
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

VERL_COLUMNS = ("prompt", "reward_model")
#: layout name -> (row mapping, input suffixes); "verl-parquet" is the older name of "verl"
LAYOUTS = ("sharegpt", "llamafactory", "verl")
_ALIASES = {"verl-parquet": "verl"}


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


def _record(obj: dict[str, Any], *, kind: SplitKind, where: str, fallback_id: str) -> Record:
    """A mapped row as a Record: inline images re-encoded as PNG, a positional id when it has none."""
    obj = dict(obj)
    obj["images"] = [{"bytes": _png(bytes(i["bytes"]), where)} if isinstance(i, dict) and "bytes" in i else i
                     for i in obj.get("images") or []]
    obj.setdefault("id", fallback_id)
    if not obj["meta"]:
        obj.pop("meta")
    return parse_record(obj, kind=kind, base_dir=Path("."), where=where)  # image paths are absolute here


# ------------------------------------------------------------------------------------------- verl

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
            where = f"{path}:row {number}"
            try:
                obj = layouts.verl_record(row, where, keep_system=keep_system, image_root=path.parent.absolute())
                yield _record(obj, kind=kind, where=where, fallback_id=f"{path.stem}-{number}")
            except RecordError as err:
                yield err


# ------------------------------------------------------------------------ ShareGPT / LLaMA-Factory

def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
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
        raise RecordError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        yield f"{path}:item {number}", row


def _llamafactory_row(row: Any, where: str, **kw: Any) -> dict[str, Any]:
    """LLaMA-Factory rows come in its alpaca or its sharegpt format; each row says which."""
    if isinstance(row, dict) and ("messages" in row or "conversations" in row):
        return layouts.sharegpt_record(row, where, **kw)
    return layouts.alpaca_record(row, where, **kw)


def iter_conversations(path: Path, kind: SplitKind, *, layout: str = "sharegpt", keep_system: bool = False,
                       image_root: Path | None = None) -> Iterator[Record | RecordError]:
    """Each row of a ShareGPT / LLaMA-Factory JSON or JSONL file as a Record (or its error). Image
    paths are relative to ``image_root`` (default: the file's folder)."""
    mapping: Callable[..., dict[str, Any]] = layouts.sharegpt_record if layout == "sharegpt" else _llamafactory_row
    root = (image_root if image_root is not None else path.parent).absolute()
    for number, (where, row) in enumerate(_json_rows(path), start=1):
        if isinstance(row, RecordError):
            yield row
            continue
        try:
            obj = mapping(row, where, keep_system=keep_system, image_root=root)
            yield _record(obj, kind=kind, where=where, fallback_id=f"{path.stem}-{number}")
        except RecordError as err:
            yield err


def iter_sharegpt(path: Path, kind: SplitKind, *, keep_system: bool = False,
                  image_root: Path | None = None) -> Iterator[Record | RecordError]:
    """:func:`iter_conversations` for the ShareGPT layout."""
    return iter_conversations(path, kind, layout="sharegpt", keep_system=keep_system, image_root=image_root)


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
    fmt = _ALIASES.get(fmt, fmt)
    skips = skips if skips is not None else SkipCounter()
    if kind not in REQUIRED_BY_KIND:
        raise RecordError(f"unknown kind {kind!r}; use one of {sorted(REQUIRED_BY_KIND)}")
    if not src.is_file():
        raise RecordError(f"{src}: no such input file")
    if fmt == "verl":
        if src.suffix != ".parquet":
            raise RecordError(f"{src}: verl input must be a .parquet file")
        rows = iter_verl_parquet(src, kind, keep_system=keep_system)
    elif fmt in ("sharegpt", "llamafactory"):
        if src.suffix not in (".json", ".jsonl"):
            raise RecordError(f"{src}: {fmt} input must be a .json or .jsonl file")
        rows = iter_conversations(src, kind, layout=fmt, keep_system=keep_system,
                                  image_root=Path(image_root) if image_root else None)
    else:
        raise RecordError(f"unknown input layout {fmt!r}; use one of {', '.join(LAYOUTS)}")
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


def add_import_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``prism import`` (shared by ``python -m megatron_prism.data.importers``)."""
    parser.add_argument("layout", choices=[*LAYOUTS, *_ALIASES], metavar="{" + ",".join(LAYOUTS) + "}",
                        help="the input's layout: sharegpt (conversations/messages), llamafactory (alpaca or "
                             "sharegpt rows), verl (RL Parquet)")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path, help="output .jsonl (images go to <stem>_images/ beside it)")
    parser.add_argument("--kind", required=True, choices=sorted(REQUIRED_BY_KIND),
                        help="the split the records are for: sft/align need a response, rl/eval an answer")
    parser.add_argument("--strict", action="store_true", help="the first bad row is an error")
    parser.add_argument("--keep-system", action="store_true", help="keep system turns in messages")
    parser.add_argument("--image-root", type=Path, help="folder ShareGPT/LLaMA-Factory image paths are relative to "
                                                        "(default: the input file's folder)")
    return parser


def run_import(args: argparse.Namespace) -> int:
    """``prism import``: exit 0 with a summary, or 2 with one line on stderr."""
    if args.output.suffix != ".jsonl":
        print(f"prism: error: {args.output}: the output must be a .jsonl file", file=sys.stderr)
        return 2
    skips = SkipCounter()
    try:
        records = import_records(args.layout, args.input, args.output, args.kind, strict=args.strict,
                                 keep_system=args.keep_system, image_root=args.image_root, skips=skips)
    except RecordError as err:
        print("prism: error: " + " ".join(str(err).split()), file=sys.stderr)  # one line
        return 2
    print(f"imported {len(records)} records to {args.output}; {skips.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_prism.data.importers",
                                     description="Import ShareGPT, LLaMA-Factory and verl layouts as record JSONL.")
    return run_import(add_import_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
