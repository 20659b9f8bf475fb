"""Shared plumbing of the benchmark loaders: reading published files, images, options, errors.

Benchmarks are published as Hugging Face ``datasets`` Parquet shards (images as ``{"bytes",
"path"}`` structs) or as JSON / JSONL annotation files beside an image folder. A loader is given a
file or a directory (a downloaded dataset snapshot); :func:`iter_rows` reads either, and
:func:`load_rows` turns rows into :class:`Record` s through a per-benchmark ``convert`` function.

Every evaluation record says how it is scored: ``meta["reward"]`` names a reward of
``megatron_prism.rewards`` (``choice``, ``numeric``, ``math``, ``yesno``) and the answer is stored
in the form that reward expects (an option letter for ``choice`` with ``meta["options"]`` holding
the option texts; ``yes``/``no`` for ``yesno``; a number for ``numeric`` with tolerances in
``meta["rel_tol"]`` / ``meta["abs_tol"]``).
``meta["alternatives"]`` lists other accepted answers, if the benchmark gives several.

Bad rows follow the record format's rule: ``strict=True`` raises :class:`RecordError` naming the
file and row; otherwise the row is skipped and counted in a :class:`SkipCounter`. A file that
cannot be read at all is always an error.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_prism.data.records import IMAGE_MARKER, ImageRef, Record, RecordError, SkipCounter
from megatron_prism.registry import Registry

#: name -> loader(path, *, split=None, strict=False, skips=None, image_root=None) -> list[Record]
BENCHMARKS: Registry[Callable[..., list[Record]]] = Registry("benchmark")

REWARDS = ("choice", "numeric", "math", "yesno")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")
Row = dict[str, Any]
Convert = Callable[[Row, "RowContext"], Record]


class RowContext:
    """Where a row came from (for messages) and where its relative image paths resolve."""

    def __init__(self, file: Path, where: str, image_dirs: list[Path]) -> None:
        self.file = file
        self.where = where
        self.image_dirs = image_dirs

    def error(self, message: str) -> RecordError:
        return RecordError(f"{self.where}: {message}")

    def field(self, row: Row, key: str, *, allow_empty: bool = False) -> Any:
        """A required field of the row (error naming the field when absent or empty)."""
        value = row.get(key)
        if value is None or (not allow_empty and isinstance(value, str) and not value.strip()):
            raise self.error(f"missing field {key!r} (have {sorted(row)})")
        return value

    def image(self, value: Any) -> ImageRef:
        """An image cell: HF ``{"bytes", "path"}`` struct, raw bytes, or a path to resolve."""
        if isinstance(value, (bytes, bytearray)):
            return ImageRef(data=bytes(value))
        if isinstance(value, dict):
            if isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
                return ImageRef(data=bytes(value["bytes"]))
            value = value.get("path")
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"image cell is empty or not an image ({type(value).__name__})")
        path = Path(value)
        candidates = [path] if path.is_absolute() else [d / path for d in self.image_dirs]
        for cand in candidates:
            if cand.is_file():
                return ImageRef(path=cand.resolve())
        raise self.error(f"image {value!r} does not exist (looked in {', '.join(str(c.parent) for c in candidates)}; "
                         "pass image_root= the folder the paths are relative to)")


@dataclass(frozen=True)
class BenchmarkSpec:
    """``--benchmark NAME=PATH[:SPLIT]``: a registered loader, its local files and the split
    (None: the loader's default, e.g. MathVision's ``testmini``; ``:test`` selects ``test``)."""

    name: str
    path: Path
    split: str | None = None

    def arg(self) -> str:
        return f"{self.name}={self.path}" + (f":{self.split}" if self.split else "")

    def default_split(self) -> str | None:
        param = inspect.signature(BENCHMARKS.get(self.name)).parameters.get("split")
        return param.default if param is not None and param.default is not inspect.Parameter.empty else None

    def load(self, *, strict: bool = False, skips: SkipCounter | None = None,
             image_root: str | Path | None = None) -> list[Record]:
        kwargs: dict[str, Any] = {"strict": strict, "skips": skips, "image_root": image_root}
        if self.split is not None:
            kwargs["split"] = self.split
        return BENCHMARKS.get(self.name)(self.path, **kwargs)


def parse_benchmark(text: str) -> BenchmarkSpec:
    """``NAME=PATH[:SPLIT]`` checked before anything is built: a registered name (with a "did you
    mean"), a path that exists, and data files for the split. Raises RecordError (one line)."""
    from megatron_prism.registry import UnknownNameError

    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise RecordError(f"--benchmark {text!r}: expected NAME=PATH[:SPLIT], e.g. --benchmark "
                          "mathvision=/data/MathVision:test")
    try:
        BENCHMARKS.get(name)
    except UnknownNameError as exc:
        raise RecordError(f"--benchmark {text}: {exc}") from None
    path, split = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and head and tail and "/" not in tail and not Path(rest).exists():
        path, split = head, tail
    spec = BenchmarkSpec(name, Path(path), split)
    if not spec.path.exists():
        raise RecordError(f"--benchmark {text}: {spec.path} does not exist; give the local folder (or file) of the "
                          f"downloaded {name} dataset")
    find_tables(spec.path, spec.split if spec.split is not None else spec.default_split())
    return spec


def find_tables(path: Path, split: str | None) -> list[Path]:
    """The data files of ``path``: itself, or the Parquet/JSON(L) files under a directory."""
    if not path.exists():
        raise RecordError(f"{path}: no such benchmark file or directory")
    if path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise RecordError(f"{path}: unknown benchmark file type {path.suffix!r}; expected {TABLE_SUFFIXES}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if split is not None:
        pattern = re.compile(rf"(^|[-./ ]){re.escape(split)}([-. ]|$)")  # "test" must not match "testmini"
        files = [p for p in files if pattern.search(p.name) or split == p.parent.name]
    if not files:
        raise RecordError(f"{path}: no {'/'.join(TABLE_SUFFIXES)} files{f' for split {split!r}' if split else ''}")
    return files


def iter_rows(file: Path) -> Iterator[tuple[int, Row]]:
    """(row number from 1, row) of one Parquet / JSON / JSONL file; JSON may be a list or an id->row map."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(file)
        except Exception as exc:  # pyarrow raises several types for a non-Parquet file
            raise RecordError(f"{file}: not a readable Parquet file ({exc})") from None
        number = 0
        for batch in table.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                number += 1
                yield number, row
        return
    if file.suffix == ".jsonl":
        with open(file, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, {"__error__": f"malformed JSON ({exc.msg} at column {exc.colno})"}
        return
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{file}: not a readable JSON file ({exc})") from None
    if isinstance(data, dict):  # MathVista's testmini.json: {pid: row}
        data = [dict(row, __key__=key) if isinstance(row, dict) else row for key, row in data.items()]
    if not isinstance(data, list):
        raise RecordError(f"{file}: expected a JSON list of rows or an id -> row object")
    yield from enumerate(data, start=1)


def load_rows(path: str | Path, convert: Convert, *, split: str | None = None, strict: bool = False,
              skips: SkipCounter | None = None, image_root: str | Path | None = None) -> list[Record]:
    """Converts every row of the benchmark files at ``path`` (strict: first bad row raises)."""
    path = Path(path)
    skips = skips if skips is not None else SkipCounter()
    records: list[Record] = []
    seen: set[str] = set()
    for file in find_tables(path, split):
        dirs = [Path(image_root)] if image_root is not None else []
        dirs += [file.parent, file.parent / "images", file.parent.parent] + ([path] if path.is_dir() else [])
        for number, row in iter_rows(file):
            ctx = RowContext(file, f"{file}:row {number}", dirs)
            try:
                if not isinstance(row, dict):
                    raise ctx.error(f"a row must be an object, got {type(row).__name__}")
                if "__error__" in row:
                    raise ctx.error(row["__error__"])
                record = convert(row, ctx)
                if record.id in seen:
                    raise ctx.error(f"duplicate id {record.id!r}")
                seen.add(record.id)
                records.append(record)
            except RecordError as err:
                if strict:
                    raise
                skips.skip(_reason(str(err)), str(err))
    return records


def _reason(text: str) -> str:
    for key, reason in (("missing field", "missing field"), ("does not exist", "missing image"), ("image", "bad image"),
                        ("JSON", "malformed JSON"), ("duplicate", "duplicate id"), ("answer", "bad answer")):
        if key in text:
            return reason
    return "invalid row"


def make_record(ctx: RowContext, *, rid: str, prompt: str, images: list[ImageRef], answer: str, reward: str,
                source: str, meta: dict[str, Any]) -> Record:
    """An evaluation record, checked: the answer is non-empty and fits its reward."""
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}")
    answer = str(answer).strip()
    if not answer:
        raise ctx.error("empty answer")
    if reward == "choice":
        options = meta.get("options") or []
        if len(answer) != 1 or not "A" <= answer <= chr(ord("A") + max(len(options), 1) - 1):
            raise ctx.error(f"answer {answer!r} is not one of the option letters A-{letter(len(options) - 1)}")
    if reward == "yesno" and answer not in ("yes", "no"):
        raise ctx.error(f"answer {answer!r} is not yes/no")
    if reward == "numeric" and to_float(answer) is None:
        raise ctx.error(f"answer {answer!r} is not a number")
    markers = prompt.count(IMAGE_MARKER)
    if markers and markers != len(images):
        raise ctx.error(f"the text has {markers} {IMAGE_MARKER} markers but the row has {len(images)} images")
    return Record(id=rid, images=images, prompt=prompt, answer=answer, source=source,
                  meta={"reward": reward, **meta}, origin=ctx.where)


def letter(index: int) -> str:
    return chr(ord("A") + index)


def format_choices(options: list[str], header: str = "Choices:") -> str:
    """``Choices:\\n(A) x\\n(B) y`` (the MathVista layout, used for every benchmark)."""
    return "\n".join([header] + [f"({letter(i)}) {opt}" for i, opt in enumerate(options)])


def literal_list(value: Any, ctx: RowContext, key: str) -> list[str]:
    """A list cell that may be stored as its Python repr (MMMU's ``options``: ``"['a', 'b']"``)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError):
            raise ctx.error(f"field {key!r} is not a list literal: {value[:60]!r}") from None
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ctx.error(f"field {key!r} must be a list, got {type(value).__name__}")
    return [str(v) for v in value]


_OPTION_RE = re.compile(r"(?:^|[\n;])\s*\(?([A-H])\s*[).:：．]\s*")


def parse_options(text: str) -> list[str]:
    """Option texts of ``"A. 3; B. 4"``, ``"A:3\\nB:4"`` or ``"(A) 3\\n(B) 4"`` (consecutive letters from A)."""
    marks = list(_OPTION_RE.finditer(text))
    letters = [m.group(1) for m in marks]
    if not letters or letters != [letter(i) for i in range(len(letters))]:
        return []
    bounds = [m.start() for m in marks[1:]] + [len(text)]
    return [text[m.end():end].strip().rstrip(";").strip() for m, end in zip(marks, bounds)]


def answer_letter(answer: Any, options: list[str], ctx: RowContext) -> str:
    """The option letter of an answer given as a letter, ``(B)``, or the option's text."""
    text = str(answer).strip()
    bare = text.strip("()").strip()
    if len(bare) == 1 and "A" <= bare.upper() < letter(max(len(options), 1)):
        return bare.upper()
    for i, opt in enumerate(options):
        if opt.strip() == text:
            return letter(i)
    folded = [o.strip().casefold() for o in options]
    if folded.count(text.casefold()) == 1:
        return letter(folded.index(text.casefold()))
    raise ctx.error(f"answer {text!r} matches no option of {options}")


def to_float(text: Any) -> float | None:
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None
