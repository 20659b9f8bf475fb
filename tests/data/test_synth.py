"""The embedded synthetic task: reproducible bytes, valid records, correct answers and captions,
SFT and alignment demonstrations that differ in fidelity only (no surface tell a classifier finds),
every demonstration within the response budget, a working tokenizer, and eval items unseen in
training.

Answers are re-derived here from the scene stored in ``meta`` by a checker written independently
of the generator's ``solve``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from megatron_prism.data.chat import SPECIAL_TOKENS, render_prompt, render_response
from megatron_prism.data.records import read_records
from megatron_prism.data.synth import SynthSizes, generate_dataset

SIZES = SynthSizes(sft=400, align=200, rl=60, eval=60)
SEED = 11
SPLITS = ("sft", "align", "rl", "eval")
TAGS = ("<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate_dataset(out, SEED, SIZES)
    return out


@pytest.fixture(scope="module")
def records(data_dir: Path) -> dict[str, list]:
    return {s: list(read_records(data_dir / s / "data.jsonl", s, strict=True)) for s in SPLITS}


def sizes_arg(s: SynthSizes) -> str:
    return f"sft={s.sft},align={s.align},rl={s.rl},eval={s.eval}"


def test_same_seed_same_bytes_other_seed_differs(data_dir: Path, tmp_path: Path) -> None:
    # The second tree comes from another process (the CLI), so Rust-side hash seeds differ too.
    cmd = [sys.executable, "-m", "megatron_prism.data.synth", "--out", str(tmp_path / "b"), "--seed", str(SEED),
           "--sizes", sizes_arg(SIZES), "--image-size", "128x128"]
    subprocess.run(cmd, check=True, capture_output=True)
    a, b = tree_bytes(data_dir), tree_bytes(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert "tokenizer/tokenizer.json" in a
    generate_dataset(tmp_path / "c", SEED + 1, SIZES)
    c = tree_bytes(tmp_path / "c")
    assert a["sft/data.jsonl"] != c["sft/data.jsonl"]
    assert sum(a[k] != c.get(k) for k in a if k.endswith(".png")) > len(a) // 2


def test_existing_output_needs_overwrite(data_dir: Path) -> None:
    with pytest.raises(FileExistsError):
        generate_dataset(data_dir, SEED, SIZES)


def test_manifest(data_dir: Path) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["seed"] == SEED
    assert manifest["counts"] == {"sft": 400, "align": 200, "rl": 60, "eval": 60}
    assert manifest["sizes"]["width"] == 128 and manifest["generator_version"]
    files = {k: v for k, v in tree_bytes(data_dir).items() if k != "manifest.json"}
    assert sorted(manifest["files"]) == sorted(files)
    for name, content in files.items():
        assert manifest["files"][name] == hashlib.sha256(content).hexdigest(), name
    assert manifest["special_token_ids"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}


# ----------------------------------------------------------------------------- independent checker

def check_answer(scene: dict, qtype: str, p: dict) -> str:
    objs = scene["objects"]

    def count(**want) -> int:
        return len([o for o in objs if all(o[k] == v for k, v in want.items())])

    if qtype == "count_color":
        return str(count(color=p["color"]))
    if qtype == "count_shape":
        return str(count(shape=p["shape"]))
    if qtype == "count_color_shape":
        return str(count(color=p["color"], shape=p["shape"]))
    if qtype == "count_size":
        return str(count(size=p["size"]))
    if qtype == "total":
        return str(len(objs))
    if qtype == "more_than":
        diff = count(shape=p["a"]) - count(shape=p["b"])
        assert diff >= 0
        return str(diff)
    if qtype == "color_of":
        (match,) = [o for o in objs if o["size"] == p["size"] and o["shape"] == p["shape"]]
        return match["color"]
    if qtype == "most_color":
        (best, n), *rest = Counter(o["color"] for o in objs).most_common()
        assert not rest or rest[0][1] < n
        return best
    if scene["kind"] == "bars":
        h = {o["color"]: o["height"] for o in objs}
        ranked = sorted(h.values())
        if qtype == "bar_height":
            return str(h[p["color"]])
        if qtype == "top2_sum":
            return str(ranked[-1] + ranked[-2])
        if qtype == "tallest_color":
            assert ranked[-1] > ranked[-2]
            return max(h, key=h.get)
        if qtype == "bar_diff":
            assert h[p["a"]] > h[p["b"]]
            return str(h[p["a"]] - h[p["b"]])
        if qtype == "bar_total":
            return str(sum(ranked))
    d = sorted(o["digit"] for o in objs)
    return {"digit_sum": str(sum(d)), "digit_max": str(d[-1]), "digit_range": str(d[-1] - d[0]),
            "digit_count_gt": str(len([x for x in d if x > p.get("k", 99)]))}[qtype]


def words_to_mention(scene: dict, qtype: str, p: dict) -> set[str]:
    """What a caption must name: the attributes of the objects the question is about."""
    objs, kind = scene["objects"], scene["kind"]
    if kind == "digits":
        return {str(o["digit"]) for o in objs}
    if kind == "bars":
        h = {o["color"]: o["height"] for o in objs}
        top = sorted(h.values(), reverse=True)
        return {"bar_height": {p.get("color", ""), str(h.get(p.get("color"), ""))},
                "bar_diff": {p.get("a", ""), p.get("b", ""), str(h.get(p.get("a"))), str(h.get(p.get("b")))},
                "top2_sum": {str(top[0]), str(top[1])},
                "tallest_color": {max(h, key=h.get), str(top[0])},
                "bar_total": {str(v) for v in h.values()}}[qtype]
    if qtype == "most_color":
        return {o["color"] for o in objs}
    if qtype == "more_than":
        rel = [o for o in objs if o["shape"] in (p["a"], p["b"])]
    else:
        rel = [o for o in objs if all(o[k] == v for k, v in p.items())]
    return {o[k] for o in rel for k in ("color", "shape", *(["size"] if "size" in p else []))}


def parts(response: str) -> tuple[str, str, str]:
    m = re.fullmatch(r"<caption>(.*)</caption><think>(.*)</think><answer>(.*)</answer>", response, re.S)
    assert m, response
    return m.group(1), m.group(2), m.group(3)


def test_records_images_answers_captions(data_dir: Path, records: dict[str, list]) -> None:
    for split in SPLITS:
        assert len(records[split]) == SIZES.count(split)
        for rec in records[split]:
            meta = rec.meta
            assert len(rec.images) == 1 and rec.prompt.startswith("<image>\n")
            with Image.open(rec.images[0].path) as img:
                assert img.size == (SIZES.width, SIZES.height) and img.mode == "RGB"
            assert rec.answer == check_answer(meta["scene"], meta["qtype"], meta["params"]), rec.id
            assert all(str(v) in rec.prompt for v in meta["params"].values()), rec.id
            if split in ("rl", "eval"):
                assert rec.response is None
                continue
            caption, think, answer = parts(rec.response)
            seen = meta.get("caption_slip", meta["scene"])  # the scene as the teacher saw it
            assert answer == meta.get("teacher_slip", check_answer(seen, meta["qtype"], meta["params"])), rec.id
            missing = {w for w in words_to_mention(seen, meta["qtype"], meta["params"]) if w not in caption}
            assert not missing, (rec.id, missing, caption)


def test_images_show_the_scene(records: dict[str, list]) -> None:
    """Spot check: a pixel at the centre of each cell holding a large shape / a bar's base."""
    from megatron_prism.data.synth.scenes import COLORS

    for rec in records["sft"][:40]:
        scene = rec.meta["scene"]
        cell = scene["cell"]
        assert cell == 32 and scene["width"] // cell == scene["height"] // cell == 4  # 16 merged vision tokens
        with Image.open(rec.images[0].path) as img:
            for o in scene["objects"]:
                if scene["kind"] == "shapes":
                    xy = (o["col"] * cell + cell // 2, o["row"] * cell + cell // 2 + 1)
                elif scene["kind"] == "bars":
                    xy = (o["col"] * cell + cell // 2, scene["height"] - 2)
                else:
                    continue
                assert img.getpixel(xy) == COLORS[o["color"]], (rec.id, o)


def bag_of_words_accuracy(docs: list[tuple[str, int]], seed: int = 0) -> float:
    """Held-out accuracy of an L2 logistic regression on word and word-pair counts (the referee's
    check for a template tell), trained on 70 % of ``docs`` (text, label), float64, LBFGS."""
    import torch

    def feats(text: str) -> list[str]:
        words = re.findall(r"<[^>]+>|\w+|[^\w\s]", text)
        return words + [a + " " + b for a, b in zip(words, words[1:])]

    vocab = {w: i for i, w in enumerate(sorted({w for text, _ in docs for w in feats(text)}))}
    x = torch.zeros(len(docs), len(vocab), dtype=torch.float64)
    for i, (text, _) in enumerate(docs):
        for w in feats(text):
            x[i, vocab[w]] += 1
    y = torch.tensor([label for _, label in docs], dtype=torch.float64)
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
    train, test = perm[: int(0.7 * len(docs))], perm[int(0.7 * len(docs)):]
    w = torch.zeros(len(vocab), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[train] @ w + b, y[train]) + 1e-2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[test] @ w + b > 0).double() == y[test]).double().mean())


def test_sft_and_align_demonstrations_have_no_surface_tell(records: dict[str, list]) -> None:
    """Issue 14: a bag-of-words classifier told the old splits apart at 100 % held-out (two styles).
    Now both splits share one template and one item distribution: on balanced samples the classifier
    stays near chance (<= 0.62; chance 0.5, and with 45 % of SFT demonstrations slipped even a
    perfect fidelity judge could reach only about 0.72). The same classifier does find a real tell
    (the scene kind, >= 0.95), so a failure to separate is the data's, not the classifier's."""
    import random

    sft = random.Random(0).sample(records["sft"], len(records["align"]))
    docs = [(r.response, 0) for r in sft] + [(r.response, 1) for r in records["align"]]
    assert bag_of_words_accuracy(docs) <= 0.62
    kinds = [(r.response, int(r.meta["scene"]["kind"] == "shapes")) for r in sft + records["align"]]
    assert bag_of_words_accuracy(kinds) >= 0.95
    # the old tell, a digit as the first caption word, and the item distribution
    first = {s: Counter(parts(r.response)[0].split()[0].isdigit() for r in records[s]) for s in ("sft", "align")}
    assert first["sft"][True] / len(records["sft"]) == pytest.approx(first["align"][True] / len(records["align"]), abs=0.08)
    for split in ("sft", "align"):
        objects = [len(r.meta["scene"]["objects"]) for r in records[split]]
        assert sum(objects) / len(objects) == pytest.approx(
            sum(len(r.meta["scene"]["objects"]) for r in records["eval"]) / len(records["eval"]), abs=0.6), split


def test_every_demonstration_fits_the_align_budget(data_dir: Path, records: dict[str, list], tmp_path: Path) -> None:
    """Each demonstration with its end token fits SynthSizes.max_response_tokens (64, ALIGN's
    budget), counted with the task's own tokenizer; a budget the template cannot fit is refused by
    the generator in one error naming the records, their lengths and the excess, and nothing is
    left behind that looks complete (no manifest)."""
    from transformers import AutoTokenizer

    from megatron_prism.data.budget import ResponseBudgetError

    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    lengths = [len(tok(render_response(r.response), add_special_tokens=False)["input_ids"])
               for s in ("sft", "align") for r in records[s]]
    assert max(lengths) <= 64 and sum(lengths) / len(lengths) < 45
    budget = sorted(lengths)[len(lengths) // 2]  # half of them are longer
    with pytest.raises(ResponseBudgetError) as err:
        generate_dataset(tmp_path / "short", SEED, SynthSizes(sft=400, align=200, rl=60, eval=60,
                                                             max_response_tokens=budget))
    message = str(err.value)
    over = sum(n > budget for n in lengths)
    assert f"{over} of {len(lengths)} demonstrations do not fit max_response_tokens={budget}" in message
    assert re.search(r"sft/data\.jsonl:synth-sft-\d{5} \(\d+ tokens, \d+ over\)", message), message
    assert f"raise max_response_tokens to at least {max(lengths)}" in message
    assert not (tmp_path / "short" / "manifest.json").exists()


def test_sft_caption_slips_misperceive_one_object(records: dict[str, list]) -> None:
    """About 15 % of SFT demonstrations misread one object: their caption is not the true scene's,
    and think and answer are right for the scene as misread; the alignment split has none."""
    from megatron_prism.data.synth.readouts import faithful_caption

    slipped = [r for r in records["sft"] if "caption_slip" in r.meta]
    assert 0.08 <= len(slipped) / len(records["sft"]) <= 0.22, len(slipped)
    for rec in slipped:
        true, seen = rec.meta["scene"]["objects"], rec.meta["caption_slip"]["objects"]
        changed = [(a, b) for a, b in zip(true, seen) if a != b]
        assert len(changed) == 1 and len(true) == len(seen), rec.id
        (a, b), = changed
        assert sum(a[k] != b[k] for k in a) == 1, (a, b)  # one attribute of one object
        caption, think, answer = parts(rec.response)
        assert caption != faithful_caption(rec.meta, rec.answer), rec.id
        assert answer == check_answer(rec.meta["caption_slip"], rec.meta["qtype"], rec.meta["params"])
        assert "teacher_slip" not in rec.meta
    assert not any("caption_slip" in r.meta for split in ("align", "rl", "eval") for r in records[split])


def test_tokenizer(data_dir: Path, records: dict[str, list]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    for t in (*SPECIAL_TOKENS, *TAGS, *"0123456789"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert len(tok("123", add_special_tokens=False)["input_ids"]) == 3
    tag_ids = tok.convert_tokens_to_ids(list(TAGS))
    assert tag_ids == list(range(len(tok) - len(TAGS), len(tok)))
    assert tok.decode(tag_ids, skip_special_tokens=True) == "".join(TAGS)  # tags are not special
    vocab = tok.get_vocab()
    for split in SPLITS:
        for rec in records[split]:
            text = render_prompt(rec) + (render_response(rec.response) if rec.response else rec.answer)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text  # exact round trip: nothing unknown, nothing dropped
            assert all(0 <= i < len(vocab) for i in ids)
    sample = render_prompt(records["sft"][0]) + render_response(records["sft"][0].response)
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_end|>", "<caption>", "<answer>"):
        assert ids.count(tok.convert_tokens_to_ids(t)) >= 1
    assert len(parts(records["sft"][0].response)) and len(tok(records["sft"][0].response)["input_ids"]) < 80


def test_eval_disjoint_from_training(records: dict[str, list]) -> None:
    def key(rec) -> str:
        return json.dumps(rec.meta["scene"]["objects"], sort_keys=True) + rec.meta["scene"]["kind"] + rec.prompt

    train = {key(r) for s in ("sft", "align", "rl") for r in records[s]}
    evals = [key(r) for r in records["eval"]]
    assert len(set(evals)) == len(evals)
    assert not train & set(evals)


def test_sft_teacher_slips_are_wrong_answers_after_right_reasoning(records: dict[str, list]) -> None:
    """About 30 % of SFT demonstrations state a wrong answer (off by one, or another colour) after a
    right caption and reasoning; the alignment demonstrations (high fidelity) never do."""
    slips = [r for r in records["sft"] if "teacher_slip" in r.meta]
    assert 0.22 <= len(slips) / len(records["sft"]) <= 0.38, len(slips)
    for rec in slips:
        wrong, right = rec.meta["teacher_slip"], rec.answer
        assert wrong != right
        assert abs(int(wrong) - int(right)) == 1 if right.isdigit() else not wrong.isdigit()
        think = parts(rec.response)[1]
        assert re.search(rf"\b{re.escape(right)}\b", think), (rec.id, think)  # the reasoning reached the truth
    assert not any("teacher_slip" in r.meta for split in ("align", "rl", "eval") for r in records[split])


def test_mechanism_readouts_see_the_teachers_slips_and_a_wrong_caption(records: dict[str, list]) -> None:
    """readouts.mechanism_rates on the teacher's own demonstrations: every SFT answer slip and nothing
    else is a slip, every caption slip and nothing else a caption error; a caption naming another
    colour, or an answer the think did not reach, is caught; records without a scene give no readout."""
    from megatron_prism.data.synth.readouts import is_slip, mechanism_rates

    for split in ("sft", "align"):
        recs = records[split]
        got = mechanism_rates([r.response for r in recs], recs)
        slips = sum("teacher_slip" in r.meta for r in recs) / len(recs)
        wrong_captions = sum("caption_slip" in r.meta for r in recs) / len(recs)
        assert got == {"eval/slip_rate": slips, "eval/caption_error_rate": wrong_captions,
                       "eval/readout_responses": float(len(recs))}, split
        for r in recs:
            p = parts(r.response)
            assert is_slip(p[1], p[2]) == ("teacher_slip" in r.meta), r.response
    recs = records["align"][:20]
    colors = ("red", "green", "blue", "yellow")
    swapped = []
    for r in recs:
        cap, think, ans = parts(r.response)
        word = next(c for c in colors if c in cap) if any(c in cap for c in colors) else None
        bad_cap = cap.replace(word, next(c for c in colors if c != word), 1) if word else cap + " 9"
        swapped.append(f"<caption>{bad_cap}</caption><think>{think}</think><answer>{ans}</answer>")
    assert mechanism_rates(swapped, recs)["eval/caption_error_rate"] == 1.0
    flipped = [r.response.replace(f"<answer>{r.answer}</answer>", "<answer>banana</answer>") for r in recs]
    assert mechanism_rates(flipped, recs)["eval/slip_rate"] == 1.0
    assert mechanism_rates(["no parts"] * len(recs), recs)["eval/readout_responses"] == 0.0
    assert mechanism_rates([r.response for r in recs], [type("R", (), {"meta": {}, "answer": "1"})()] * len(recs)) == {}


def test_report_md_shows_the_readouts_before_and_after_each_stage() -> None:
    from megatron_prism.pipeline import readout_table
    from megatron_prism.training.loop import StageResult

    def figures(slip: float, cap: float) -> dict:
        return {"eval/slip_rate": slip, "eval/caption_error_rate": cap, "eval/readout_responses": 700.0}

    results = [StageResult("sft", None, 3, 1.0, {"eval_before": {}, "eval_after": figures(0.3, 0.25)}),
               StageResult("warmup", None, 2, 1.0, {}),
               StageResult("align", None, 2, 1.0, {"eval_before": figures(0.3, 0.25), "eval_after": figures(0.1, 0.125)})]
    rows = readout_table(results)
    assert rows[-2:] == ["| sft | - -> 0.300 | - -> 0.250 | - -> 700 |",
                         "| align | 0.300 -> 0.100 | 0.250 -> 0.125 | 700 -> 700 |"]
    assert readout_table(results[1:2]) == []
