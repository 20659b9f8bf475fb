"""Loaders of the visual maths benchmarks: MathVista, MathVerse, MathVision, WeMath.

Field names follow the published datasets as PRISM's lmms-eval task overrides read them
(``scripts/eval/tasks/*/utils.py`` in XIAO4579/PRISM):

* MathVista (``AI4Math/MathVista``, testmini): ``pid, question, image, decoded_image, choices,
  unit, precision, answer, question_type (multi_choice/free_form), answer_type
  (text/integer/float/list), query, metadata``. Multiple-choice answers are the choice *text*;
  we store the letter. Float answers are compared after rounding to ``precision`` decimals, which
  we express as an absolute tolerance of half a unit in the last place (``meta["abs_tol"]``).
* MathVerse (``AI4Math/MathVerse`` testmini): ``sample_index, problem_index, problem_version,
  question, image, answer, question_type (multi-choice/free-form), query_wo, query_cot,
  question_for_eval, metadata``. Choices are inside the question text; the text-only version has
  an empty image.
* MathVision (``MathLLMs/MathVision``, test/testmini): ``id, question, options, image,
  decoded_image, answer, solution, level, subject``; the answer is a letter when there are options.
* WeMath (``We-Math/We-Math`` testmini): ``ID, split, knowledge concept, question, option,
  answer, image_path, key, question number, knowledge concept description``; ``option`` is one
  string (``"A. 3; B. 4; ..."``) and the prompt is ``question + "\\n" + option`` as in PRISM.
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_prism.data.records import Record, SkipCounter
from megatron_prism.eval.loading import (
    BENCHMARKS,
    Row,
    RowContext,
    answer_letter,
    format_choices,
    letter,
    literal_list,
    load_rows,
    make_record,
    parse_options,
    to_float,
)


def _images(ctx: RowContext, *cells: object) -> list:
    """The first non-empty image cell of ``cells`` (decoded bytes first, then a path), or none."""
    for cell in cells:
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            continue
        if isinstance(cell, dict) and not cell.get("bytes") and not cell.get("path"):
            continue
        return [ctx.image(cell)]
    return []


# ---------------------------------------------------------------------------------------- MathVista

def _mathvista(row: Row, ctx: RowContext) -> Record:
    pid = str(row.get("pid") or row.get("__key__") or "")
    if not pid:
        raise ctx.error("missing field 'pid'")
    question = ctx.field(row, "question")
    qtype = ctx.field(row, "question_type")
    atype = row.get("answer_type") or "text"
    answer = str(ctx.field(row, "answer"))
    choices = literal_list(row.get("choices"), ctx, "choices")
    meta = {"pid": pid, "question_type": qtype, "answer_type": atype, "unit": row.get("unit") or "",
            "metadata": row.get("metadata") or {}}
    prompt = row.get("query") or (question + ("\n" + format_choices(choices) if choices else ""))
    images = _images(ctx, row.get("decoded_image"), row.get("image"))
    if qtype == "multi_choice":
        if not choices:
            raise ctx.error("multi_choice question without 'choices'")
        reward, answer = "choice", answer_letter(answer, choices, ctx)
        meta["options"] = choices
    elif atype in ("integer", "float"):
        value = to_float(answer)
        if value is None:
            raise ctx.error(f"{atype} answer {answer!r} is not a number")
        precision = int(row.get("precision") or 0) if atype == "float" else 0
        reward = "numeric"  # MathVista rounds floats to `precision` decimals: within half a unit of the last one
        meta.update(precision=precision, rel_tol=0.0)
        if atype == "float":
            meta["abs_tol"] = 0.5 * 10.0 ** -precision
    elif qtype == "free_form":
        reward = "math"  # list answers ("[2007, 2008]") and text answers
    else:
        raise ctx.error(f"unknown question_type {qtype!r} (expected multi_choice/free_form)")
    return make_record(ctx, rid=f"mathvista-{pid}", prompt=prompt, images=images, answer=answer, reward=reward,
                       source="mathvista", meta=meta)


@BENCHMARKS.register("mathvista")
def load_mathvista(path: str | Path, *, split: str | None = "testmini", strict: bool = False,
                   skips: SkipCounter | None = None, image_root: str | Path | None = None) -> list[Record]:
    """MathVista (testmini by default) from its Parquet shards or ``testmini.json`` + ``images/``."""
    return load_rows(path, _mathvista, split=split, strict=strict, skips=skips, image_root=image_root)


# ---------------------------------------------------------------------------------------- MathVerse

_CHOICES_RE = re.compile(r"(?:Choices|Options)\s*[:：]\s*", re.IGNORECASE)


def _mathverse(row: Row, ctx: RowContext) -> Record:
    index = row.get("sample_index")
    if index is None or str(index) == "":
        raise ctx.error("missing field 'sample_index'")
    question = str(row.get("question") or "")
    prompt = row.get("query_wo") or question
    if not str(prompt).strip():
        raise ctx.error("missing field 'question' / 'query_wo'")
    qtype = ctx.field(row, "question_type")
    answer = str(ctx.field(row, "answer"))
    meta = {"sample_index": str(index), "problem_index": str(row.get("problem_index", "")),
            "problem_version": row.get("problem_version") or "", "question_type": qtype,
            "question_for_eval": row.get("question_for_eval") or question, "metadata": row.get("metadata") or {}}
    if qtype == "multi-choice":
        found = _CHOICES_RE.split(question, maxsplit=1)
        options = parse_options(found[1]) if len(found) == 2 else []
        if not options:  # vision-only versions draw the choices in the image: letters A..max(D, answer)
            bare = answer.strip().strip("()").upper()
            last = max(3, ord(bare) - ord("A")) if len(bare) == 1 and bare.isalpha() else 3
            options = [letter(i) for i in range(last + 1)]
        meta["options"] = options
        reward, answer = "choice", answer_letter(answer, options, ctx)
    elif qtype == "free-form":
        reward = "math"
    else:
        raise ctx.error(f"unknown question_type {qtype!r} (expected multi-choice/free-form)")
    return make_record(ctx, rid=f"mathverse-{index}", prompt=str(prompt), images=_images(ctx, row.get("image")),
                       answer=answer, reward=reward, source="mathverse", meta=meta)


@BENCHMARKS.register("mathverse")
def load_mathverse(path: str | Path, *, split: str | None = "testmini", strict: bool = False,
                   skips: SkipCounter | None = None, image_root: str | Path | None = None) -> list[Record]:
    """MathVerse (testmini) from its Parquet shards or ``testmini.json`` + ``images/``."""
    return load_rows(path, _mathverse, split=split, strict=strict, skips=skips, image_root=image_root)


# --------------------------------------------------------------------------------------- MathVision

def _mathvision(row: Row, ctx: RowContext) -> Record:
    rid = str(ctx.field(row, "id"))
    question = ctx.field(row, "question")
    options = literal_list(row.get("options"), ctx, "options")
    answer = str(ctx.field(row, "answer"))
    meta = {"level": row.get("level"), "subject": row.get("subject") or ""}
    if options:
        prompt = question + "\n" + format_choices(options)
        meta["options"] = options
        reward, answer = "choice", answer_letter(answer, options, ctx)
    else:
        prompt, reward = question, "math"
    return make_record(ctx, rid=f"mathvision-{rid}", prompt=prompt,
                       images=_images(ctx, row.get("decoded_image"), row.get("image")),
                       answer=answer, reward=reward, source="mathvision", meta=meta)


@BENCHMARKS.register("mathvision")
def load_mathvision(path: str | Path, *, split: str | None = "testmini", strict: bool = False,
                    skips: SkipCounter | None = None, image_root: str | Path | None = None) -> list[Record]:
    """MathVision (``testmini`` or ``test``) from Parquet shards or ``<split>.jsonl`` + ``images/``."""
    return load_rows(path, _mathvision, split=split, strict=strict, skips=skips, image_root=image_root)


# ------------------------------------------------------------------------------------------- WeMath

def _wemath(row: Row, ctx: RowContext) -> Record:
    pid = str(ctx.field(row, "ID"))
    key = str(row.get("key") or "")
    question = ctx.field(row, "question")
    option_text = str(ctx.field(row, "option"))
    options = parse_options(option_text)
    if not options:
        raise ctx.error(f"cannot read the options of {option_text[:80]!r} (expected 'A. ...; B. ...')")
    meta = {"ID": pid, "key": key, "knowledge_concept": row.get("knowledge concept") or "",
            "question_number": row.get("question number"), "options": options}
    answer = answer_letter(ctx.field(row, "answer"), options, ctx)
    return make_record(ctx, rid=f"wemath-{pid}-{key}" if key else f"wemath-{pid}",
                       prompt=f"{question}\n{option_text}", images=_images(ctx, row.get("image_path")),
                       answer=answer, reward="choice", source="wemath", meta=meta)


@BENCHMARKS.register("wemath")
def load_wemath(path: str | Path, *, split: str | None = "testmini", strict: bool = False,
                skips: SkipCounter | None = None, image_root: str | Path | None = None) -> list[Record]:
    """WeMath (testmini) from its Parquet shards or ``testmini.json`` + image folder."""
    return load_rows(path, _wemath, split=split, strict=strict, skips=skips, image_root=image_root)
