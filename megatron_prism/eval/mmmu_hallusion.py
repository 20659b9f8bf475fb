"""Loaders of MMMU (validation), MMMU-Pro (standard and vision) and HallusionBench.

Field names follow the published datasets as PRISM's lmms-eval task overrides read them
(``scripts/eval/tasks/{mmmu,mmmu_pro,hallusion_bench}`` in XIAO4579/PRISM):

* MMMU (``MMMU/MMMU``, one Parquet folder per subject, split ``validation``): ``id``
  (``validation_<Subject>_<n>``), ``question``, ``options`` (a Python list literal), ``answer``,
  ``image_1`` .. ``image_7``, ``question_type`` (``multiple-choice``/``open``), ``img_type``,
  ``topic_difficulty``, ``subfield``. As in PRISM (``interleaved_format: false``), the images are
  those named by ``<image N>`` tags in the question and options, in sorted order, placed before the
  text; the tags stay in the text. Open answers may be a list literal of accepted answers.
* MMMU-Pro (``MMMU/MMMU_Pro``): the ``standard (10 options)`` / ``standard (4 options)`` configs
  have MMMU's fields plus ``subject``; the ``vision`` config has ``id, image, options, answer,
  subject`` (the question is inside the screenshot). A row's shape decides, as in PRISM.
* HallusionBench (``lmms-lab/HallusionBench`` split ``image``, or the original
  ``HallusionBench.json`` + ``hallusion_bench/`` folder): ``category, subcategory, visual_input,
  set_id, figure_id, sample_note, question_id, question, gt_answer_details, gt_answer ("1"/"0"),
  filename, image``. Answers become ``yes``/``no``; the ids needed for question-pair (qAcc) and
  per-figure (fAcc) accuracy are kept in ``meta`` (see :func:`hallusion_accuracies`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from megatron_prism.data.records import Record, SkipCounter
from megatron_prism.eval.loading import (
    BENCHMARKS,
    Row,
    RowContext,
    answer_letter,
    format_choices,
    literal_list,
    load_rows,
    make_record,
    to_float,
)

_IMAGE_TAG = re.compile(r"<image (\d+)>")
MMMU_MC_PROMPT = "Answer with the option's letter from the given choices."
#: MMMU scores open numeric answers after rounding to 2 decimals; a 1% relative tolerance is our rule.
MMMU_OPEN_REL_TOL = 0.01


def _tagged_images(row: Row, ctx: RowContext, text: str) -> list:
    numbers = sorted({int(n) for n in _IMAGE_TAG.findall(text)})
    images = []
    for n in numbers:
        cell = row.get(f"image_{n}")
        if cell is None:
            raise ctx.error(f"the text names <image {n}> but field 'image_{n}' is empty")
        images.append(ctx.image(cell))
    return images


def _answers(value: object, ctx: RowContext) -> list[str]:
    """An answer cell: a string, or a list (or list literal) of accepted answers."""
    if isinstance(value, str) and value.strip().startswith("["):
        return literal_list(value, ctx, "answer")
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)] if value is not None else []


def _mmmu_like(row: Row, ctx: RowContext, source: str) -> Record:
    rid = str(ctx.field(row, "id"))
    answers = _answers(ctx.field(row, "answer"), ctx)
    if not answers:
        raise ctx.error("empty answer")
    options = literal_list(row.get("options"), ctx, "options")
    meta: dict = {"subject": row.get("subject") or _mmmu_subject(rid), "img_type": row.get("img_type"),
                  "topic_difficulty": row.get("topic_difficulty")}
    if "question" not in row:  # MMMU-Pro vision: the question is in the image
        if not options:
            raise ctx.error("vision row without 'options'")
        meta.update(options=options, setting="vision")
        prompt = f"{format_choices(options, 'Options:')}\n\n{MMMU_MC_PROMPT}"
        return make_record(ctx, rid=f"{source}-{rid}", prompt=prompt, images=[ctx.image(ctx.field(row, "image"))],
                           answer=answer_letter(answers[0], options, ctx), reward="choice", source=source, meta=meta)
    question = ctx.field(row, "question")
    qtype = row.get("question_type") or "multiple-choice"  # MMMU-Pro rows are all multiple choice
    meta["question_type"] = qtype
    if qtype == "multiple-choice":
        if not options:
            raise ctx.error("multiple-choice question without 'options'")
        prompt = f"{question}\n{format_choices(options, 'Options:')}\n\n{MMMU_MC_PROMPT}"
        letters = [answer_letter(a, options, ctx) for a in answers]
        meta["options"] = options
        if letters[1:]:
            meta["alternatives"] = letters[1:]
        answer, reward = letters[0], "choice"
    elif qtype == "open":
        prompt = question
        answer, reward = answers[0], "math"
        if all(to_float(a) is not None for a in answers):
            reward = "numeric"
            meta["rel_tol"] = MMMU_OPEN_REL_TOL
        if answers[1:]:
            meta["alternatives"] = answers[1:]
    else:
        raise ctx.error(f"unknown question_type {qtype!r} (expected multiple-choice/open)")
    images = _tagged_images(row, ctx, question + "\n" + "\n".join(options))
    return make_record(ctx, rid=f"{source}-{rid}", prompt=prompt, images=images, answer=answer, reward=reward,
                       source=source, meta=meta)


def _mmmu_subject(rid: str) -> str:
    match = re.match(r"^[a-z]+_(.+?)_\d+$", rid)
    return match.group(1) if match else ""


@BENCHMARKS.register("mmmu")
def load_mmmu(path: str | Path, *, split: str | None = "validation", strict: bool = False,
              skips: SkipCounter | None = None, image_root: str | Path | None = None) -> list[Record]:
    """MMMU (validation) from the per-subject Parquet shards under ``path``."""
    return load_rows(path, lambda row, ctx: _mmmu_like(row, ctx, "mmmu"), split=split, strict=strict, skips=skips,
                     image_root=image_root)


@BENCHMARKS.register("mmmu_pro")
def load_mmmu_pro(path: str | Path, *, split: str | None = "test", strict: bool = False,
                  skips: SkipCounter | None = None, image_root: str | Path | None = None) -> list[Record]:
    """MMMU-Pro from one config's Parquet shards (standard 10/4 options, or vision), split ``test``."""
    return load_rows(path, lambda row, ctx: _mmmu_like(row, ctx, "mmmu_pro"), split=split, strict=strict,
                     skips=skips, image_root=image_root)


# ----------------------------------------------------------------------------------- HallusionBench

_HB_KEYS = ("category", "subcategory", "set_id", "figure_id", "question_id")


def _hallusion(row: Row, ctx: RowContext) -> Record:
    keys = {k: str(ctx.field(row, k)) for k in _HB_KEYS}
    gt = str(ctx.field(row, "gt_answer")).strip()
    if gt not in ("0", "1"):
        raise ctx.error(f"gt_answer {gt!r} is not 0/1")
    visual = str(row.get("visual_input", "1"))
    cell = row.get("image") or row.get("filename")
    if isinstance(cell, dict) and not cell.get("bytes") and not cell.get("path"):
        cell = None
    if cell is None and visual != "0":
        raise ctx.error("missing field 'image' / 'filename' for a question with visual input")
    images = [ctx.image(cell)] if cell is not None else []
    meta = {**keys, "visual_input": visual, "gt_answer_details": row.get("gt_answer_details") or "",
            "sample_note": row.get("sample_note") or ""}
    return make_record(ctx, rid="hallusion-" + "_".join(keys[k] for k in _HB_KEYS),
                       prompt=ctx.field(row, "question"), images=images, answer="yes" if gt == "1" else "no",
                       reward="yesno", source="hallusion_bench", meta=meta)


@BENCHMARKS.register("hallusion_bench")
def load_hallusion_bench(path: str | Path, *, split: str | None = "image", strict: bool = False,
                         skips: SkipCounter | None = None, image_root: str | Path | None = None) -> list[Record]:
    """HallusionBench from ``lmms-lab/HallusionBench`` Parquet (split ``image``) or ``HallusionBench.json``.

    With the JSON file, ``filename`` (``./hallusion_bench/VD/...png``) resolves against the JSON's
    folder or ``image_root``; rows without visual input (``visual_input == "0"``) have no image.
    """
    return load_rows(path, _hallusion, split=split, strict=strict, skips=skips, image_root=image_root)


def hallusion_accuracies(records: list[Record], scores: dict[str, list[float]]) -> dict[str, float]:
    """HallusionBench's aAcc (per question), qAcc (all figures of a question right) and fAcc (all
    questions of a figure right), from per-item sample scores (an item counts as right with mean
    score >= 0.5). Rule-based only: PRISM's judge-scored "unclear" answers have no counterpart here.
    """
    right = {r.id: (sum(scores[r.id]) / len(scores[r.id])) >= 0.5 for r in records if scores.get(r.id)}
    by_question: dict[str, list[bool]] = defaultdict(list)
    by_figure: dict[str, list[bool]] = defaultdict(list)
    def key(meta: dict, last: str) -> str:
        return "_".join(str(meta[k]) for k in ("category", "subcategory", "set_id", last))

    for r in records:
        if r.id not in right:
            continue
        by_question[key(r.meta, "question_id")].append(right[r.id])
        if not (r.meta["category"] == "VS" and str(r.meta["figure_id"]) == "0"):  # VS figure 0: no figure
            by_figure[key(r.meta, "figure_id")].append(right[r.id])

    def all_right(groups: dict[str, list[bool]]) -> float:
        return sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0

    return {"aAcc": sum(right.values()) / len(right) if right else 0.0,
            "qAcc": all_right(by_question), "fAcc": all_right(by_figure)}
