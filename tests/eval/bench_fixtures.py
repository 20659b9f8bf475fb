"""Tiny benchmark files in each benchmark's published layout (a few items, PIL-made images).

Parquet files mimic Hugging Face ``datasets`` shards (images as ``{"bytes", "path"}`` structs,
file names like ``testmini-00000-of-00001.parquet``); JSON/JSONL files mimic the GitHub releases
(image paths relative to the annotation file).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def hf_image(color: tuple[int, int, int] = (200, 10, 10), name: str = "x.png") -> dict:
    return {"bytes": png(color), "path": name}


def save_png(path: Path, color: tuple[int, int, int] = (10, 200, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), color).save(path)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def mathvista_rows() -> list[dict]:
    meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
            "language": "english", "skills": ["geometry reasoning"], "source": "Geometry3K", "split": "testmini",
            "task": "geometry problem solving"}
    base = {"unit": None, "metadata": meta, "image": "images/{}.jpg"}
    return [
        {**base, "pid": "1", "question": "Which city is largest?", "choices": ["hong kong", "osaka", "tokyo"],
         "precision": None, "answer": "tokyo", "question_type": "multi_choice", "answer_type": "text",
         "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
                  "end.\nQuestion: Which city is largest?\nChoices:\n(A) hong kong\n(B) osaka\n(C) tokyo"},
        {**base, "pid": "2", "question": "How many objects?", "choices": None, "precision": None, "answer": "14",
         "question_type": "free_form", "answer_type": "integer", "query": "Hint: integer.\nQuestion: How many?"},
        {**base, "pid": "3", "question": "What is the cost?", "choices": None, "precision": 2.0, "answer": "1.45",
         "question_type": "free_form", "answer_type": "float", "query": "Hint: two decimals.\nQuestion: cost?"},
        {**base, "pid": "4", "question": "Peak years?", "choices": None, "precision": None, "answer": "[2007, 2008]",
         "question_type": "free_form", "answer_type": "list", "query": "Hint: list.\nQuestion: Peak years?"},
    ]


def write_mathvista_parquet(folder: Path) -> Path:
    rows = [dict(r, image=r["image"].format(r["pid"]), decoded_image=hf_image()) for r in mathvista_rows()]
    return write_parquet(folder / "data" / "testmini-00000-of-00001-abc.parquet", rows)


def write_mathvista_json(folder: Path) -> Path:
    """The GitHub release: ``testmini.json`` is an object keyed by pid; images/ beside it."""
    data = {}
    for r in mathvista_rows():
        r = dict(r, image=r["image"].format(r["pid"]))
        save_png(folder / r["image"])
        data[r["pid"]] = r
    path = folder / "testmini.json"
    path.write_text(json.dumps(data))
    return path


def write_mathverse(folder: Path) -> Path:
    common = {"problem_version": "Text Dominant", "metadata": {"split": "testmini", "subject": "Plane Geometry"}}
    rows = [
        {**common, "sample_index": "1", "problem_index": "1", "image": hf_image(),
         "question": "As shown, find angle BCD.\nChoices:\nA:40°\nB:50°\nC:60°\nD:70°", "answer": "B",
         "question_type": "multi-choice", "query_wo": "Please answer the question.\nQuestion: find angle BCD.\n"
         "Choices:\nA:40°\nB:50°\nC:60°\nD:70°", "query_cot": "...", "question_for_eval": "find angle BCD"},
        {**common, "sample_index": "2", "problem_index": "1", "image": hf_image(), "question": "Find the length AB.",
         "answer": "2\\sqrt{3}", "question_type": "free-form", "query_wo": "Question: Find the length AB.",
         "query_cot": "...", "question_for_eval": "Find the length AB."},
        {**common, "sample_index": "3", "problem_index": "2", "problem_version": "Vision Only", "image": hf_image(),
         "question": "", "answer": "C", "question_type": "multi-choice",
         "query_wo": "Please directly answer the question in the image.", "query_cot": "...", "question_for_eval": ""},
        {**common, "sample_index": "4", "problem_index": "3", "problem_version": "Text Only", "image": None,
         "question": "A circle has radius 2. Find its area.", "answer": "4\\pi", "question_type": "free-form",
         "query_wo": "Question: A circle has radius 2. Find its area.", "query_cot": "...", "question_for_eval": "x"},
    ]
    return write_parquet(folder / "testmini-00000-of-00001.parquet", rows)


def write_mathvision(folder: Path, split: str = "testmini") -> Path:
    rows = [
        {"id": "1", "question": "<image1>\nWhich shape is next?", "options": ["A", "B", "C", "D", "E"],
         "image": "images/1.jpg", "answer": "C", "solution": None, "level": 2, "subject": "logic"},
        {"id": "2", "question": "<image1>\nHow many squares?", "options": [], "image": "images/2.jpg",
         "answer": "17", "solution": None, "level": 3, "subject": "counting"},
        {"id": "3", "question": "Which value?", "options": ["$\\frac{1}{2}$", "$1$", "$2$"], "image": "images/3.jpg",
         "answer": "$1$", "solution": None, "level": 1, "subject": "algebra"},
    ]
    for r in rows:
        save_png(folder / r["image"])
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_wemath(folder: Path) -> Path:
    rows = [
        {"ID": "2steps_1", "split": "testmini", "knowledge concept": "Area of rectangles",
         "question": "The rectangle is 3 by 4. What is its area?", "option": "A. 7; B. 12; C. 14; D. 24; "
         "E. No correct answer", "answer": "B", "image_path": "2steps_1.png", "key": "2steps_1",
         "question number": 1, "knowledge concept description": "..."},
        {"ID": "2steps_1", "split": "testmini", "knowledge concept": "Perimeter",
         "question": "What is its perimeter?", "option": "A. 7; B. 12; C. 14; D. 24; E. No correct answer",
         "answer": "C", "image_path": "2steps_1.png", "key": "2steps_multi", "question number": 2,
         "knowledge concept description": "..."},
    ]
    save_png(folder / "images" / "2steps_1.png")
    path = folder / "testmini.json"
    path.write_text(json.dumps(rows))
    return path


def mmmu_row(n: int, subject: str, **over) -> dict:
    row = {"id": f"validation_{subject}_{n}", "question": "<image 1> What is the value of X?",
           "options": "['$6', '$7', '$8', '$9']", "explanation": "", "answer": "B", "img_type": "['Tables']",
           "topic_difficulty": "Easy", "question_type": "multiple-choice", "subfield": "Financial Accounting",
           **{f"image_{i}": None for i in range(1, 8)}}
    row["image_1"] = hf_image()
    row.update(over)
    return row


def write_mmmu(folder: Path) -> Path:
    write_parquet(folder / "Accounting" / "validation-00000-of-00001.parquet", [
        mmmu_row(1, "Accounting"),
        mmmu_row(2, "Accounting", question="Compare <image 2> with <image 1>.",
                 options="['<image 3>', 'neither']", image_2=hf_image((0, 0, 9)), image_3=hf_image((9, 0, 0)),
                 answer="A"),
    ])
    write_parquet(folder / "Math" / "validation-00000-of-00001.parquet", [
        mmmu_row(1, "Math", question="<image 1> Compute the slope.", options="[]", answer="['0.5', '1/2']",
                 question_type="open"),
        mmmu_row(2, "Math", question="<image 1> Name the curve.", options="[]", answer="parabola",
                 question_type="open"),
    ])
    write_parquet(folder / "Math" / "dev-00000-of-00001.parquet", [mmmu_row(9, "Math")])  # not validation
    return folder


def write_mmmu_pro(folder: Path) -> tuple[Path, Path]:
    opts = str([f"opt{i}" for i in range(10)])
    standard = write_parquet(folder / "standard (10 options)" / "test-00000-of-00001.parquet", [
        {k: v for k, v in mmmu_row(1, "History", options=opts, answer="J").items()
         if k not in ("question_type", "subfield")} | {"id": "test_History_1", "subject": "History"},
    ])
    vision = write_parquet(folder / "vision" / "test-00000-of-00001.parquet", [
        {"id": "test_Art_4", "image": hf_image(), "options": "['red', 'green', 'blue', 'black']", "answer": "C",
         "subject": "Art"},
    ])
    return standard, vision


def hallusion_rows() -> list[dict]:
    def row(cat, sub, set_id, fig, q, gt, visual="1", filename=None):
        return {"category": cat, "subcategory": sub, "visual_input": visual, "set_id": str(set_id),
                "figure_id": str(fig), "sample_note": "note", "question_id": str(q),
                "question": f"Is statement {q} true for figure {fig}?", "gt_answer_details": "details",
                "gt_answer": str(gt), "filename": filename}
    return [
        row("VD", "ocr", 0, 0, 0, 1, filename="./hallusion_bench/VD/ocr/0_0.png"),
        row("VD", "ocr", 0, 1, 0, 0, filename="./hallusion_bench/VD/ocr/0_1.png"),
        row("VD", "ocr", 0, 0, 1, 1, filename="./hallusion_bench/VD/ocr/0_0.png"),
        row("VS", "chart", 1, 0, 0, 1, visual="0"),
        row("VS", "chart", 1, 1, 0, 0, filename="./hallusion_bench/VS/chart/1_1.png"),
    ]


def write_hallusion_json(folder: Path) -> Path:
    rows = hallusion_rows()
    for r in rows:
        if r["filename"]:
            save_png(folder / r["filename"])
    path = folder / "HallusionBench.json"
    path.write_text(json.dumps(rows))
    return path


def write_hallusion_parquet(folder: Path) -> Path:
    rows = [dict(r, image=hf_image() if r["filename"] else None) for r in hallusion_rows() if r["visual_input"] != "0"]
    write_parquet(folder / "data" / "non_image-00000-of-00001.parquet",
                  [dict(r, image=None) for r in hallusion_rows() if r["visual_input"] == "0"])
    return write_parquet(folder / "data" / "image-00000-of-00001.parquet", rows)
