"""Writes the embedded task: four splits of records + images, a tokenizer, and a manifest.

Layout of ``out_dir``::

    sft/data.jsonl    sft/images/00000.png ...    terse demonstrations, easier items, 30 % of them
                                                  ending in a wrong answer (a teacher's slip)
    align/data.jsonl  align/images/...            dense demonstrations, harder items
    rl/data.jsonl     rl/images/...               answers only, full range of difficulty
    eval/data.jsonl   eval/images/...             answers only, none equal to a training item
    tokenizer/        tokenizer.json, tokenizer_config.json, special_tokens_map.json
    manifest.json     seed, sizes, counts, generator version, special token ids, sha256 per file

Each split draws from its own ``random.Random`` seeded from (seed, split name), so a split does not
change when another split's size does (eval excepted: it skips items seen in training). Nothing
written depends on time or machine, so one seed gives byte-identical trees.

Default sizes (sft 2000, align 500, rl 1000, eval 200, 64x64 images): a tiny model (hidden 64,
4 layers) sees the whole SFT split in a few hundred steps of batch 8 on a CPU, so SFT takes a few
minutes; alignment holds a quarter as much (as PRISM's alignment set is smaller than its SFT set);
RL needs prompts for a few hundred rollout steps; 200 eval items give accuracy to +-3.5 points
(one standard error at 50 %), enough to see learning. 64x64 images with patch 16 and merge 2 are
4 merged vision tokens per image.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_prism.data.chat import PRISM_SYSTEM_PROMPT, render_prompt, render_response
from megatron_prism.data.records import IMAGE_MARKER, ImageRef, Record, write_jsonl
from megatron_prism.data.synth.questions import QTYPES, Question, sample_question, teacher_response
from megatron_prism.data.synth.scenes import COLORS, SCENE_MAKERS, Scene, render_scene, save_png, scene_key
from megatron_prism.data.synth.tokenizer import (DEFAULT_VOCAB_SIZE, TAG_TOKENS, check_tokenizer,
                                                 save_tokenizer, special_token_ids, train_tokenizer)

GENERATOR_VERSION = "prism-synth-2"
SOURCE = "prism-synth"
SPLITS = ("sft", "align", "rl", "eval")
TRAIN_SPLITS = ("sft", "align", "rl")


@dataclass
class SynthSizes:
    """How much to generate: records per split, image size, tokenizer vocabulary."""

    sft: int = 2000
    align: int = 500
    rl: int = 1000
    eval: int = 200
    width: int = 64
    height: int = 64
    cell: int = 16  # grid cell in pixels; keep it equal to the vision patch size
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def count(self, split: str) -> int:
        return int(getattr(self, split))


@dataclass
class SplitProfile:
    """Difficulty and demonstration style of a split."""

    style: str | None  # "terse" / "dense" demonstrations, None: answers only
    n_objects: dict[str, tuple[int, int]]  # scene kind -> (min, max) objects
    kind_weights: dict[str, float] = field(default_factory=lambda: {"shapes": 2.0, "bars": 1.0, "digits": 1.0})
    qtype_weights: dict[str, float] = field(default_factory=dict)  # default weight 1
    # Fraction of demonstrations whose final answer is wrong although caption and reasoning are
    # right, as in public SFT corpora (transcription slips, mislabelled items). Imitation copies
    # the slip; a verifiable reward (RLVR) and high-fidelity demonstrations (ALIGN) correct it.
    answer_noise: float = 0.0


_HARD = {"more_than": 3.0, "most_color": 2.0, "count_color_shape": 2.0, "top2_sum": 2.0, "bar_diff": 2.0,
         "bar_total": 2.0, "digit_range": 2.0, "digit_count_gt": 2.0, "digit_sum": 2.0}
PROFILES: dict[str, SplitProfile] = {
    "sft": SplitProfile("terse", {"shapes": (2, 5), "bars": (3, 4), "digits": (2, 3)}, answer_noise=0.3),
    "align": SplitProfile("dense", {"shapes": (4, 7), "bars": (4, 5), "digits": (3, 4)}, qtype_weights=_HARD),
    "rl": SplitProfile(None, {"shapes": (2, 7), "bars": (3, 5), "digits": (2, 4)}),
    "eval": SplitProfile(None, {"shapes": (2, 7), "bars": (3, 5), "digits": (2, 4)}),
}


@dataclass
class Manifest:
    seed: int
    sizes: dict[str, int]
    counts: dict[str, int]
    generator_version: str
    special_token_ids: dict[str, int]
    tag_token_ids: dict[str, int]
    vocab_size: int
    files: dict[str, str]  # path relative to out_dir -> sha256

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def split_rng(seed: int, split: str) -> random.Random:
    """The split's own random stream (independent of the other splits' sizes)."""
    digest = hashlib.sha256(f"{GENERATOR_VERSION}:{seed}:{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    names = sorted(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _noise_rng(seed: int, split: str, index: int) -> random.Random:
    """A stream of its own for the teacher's slips, so adding them leaves the items unchanged."""
    digest = hashlib.sha256(f"{GENERATOR_VERSION}:{seed}:{split}:slip:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible slip: a count or value off by one, or another colour."""
    if answer.isdigit():
        value = int(answer)
        return str(value + 1 if value == 0 or rng.random() < 0.5 else value - 1)
    return rng.choice([c for c in COLORS if c != answer])


def sample_item(rng: random.Random, profile: SplitProfile, sizes: SynthSizes) -> tuple[Scene, Question]:
    """One scene and an applicable question, drawn with the profile's difficulty."""
    while True:
        kind = _weighted(rng, profile.kind_weights)
        scene = SCENE_MAKERS[kind](rng, sizes.width, sizes.height, profile.n_objects[kind], sizes.cell)
        qtype = _weighted(rng, {q: profile.qtype_weights.get(q, 1.0) for q in QTYPES[kind]})
        question = sample_question(rng, scene, qtype)
        if question is not None:
            return scene, question


def item_key(scene: Scene, question: Question) -> str:
    """What makes two items the same: the scene's contents and the question text."""
    return scene_key(scene) + "|" + question.text


def make_split(out_dir: Path, split: str, seed: int, sizes: SynthSizes,
               exclude: set[str] | None = None) -> tuple[list[Record], set[str]]:
    """Writes ``out_dir/split`` (images + data.jsonl); returns its records and item keys.

    Items whose key is in ``exclude`` or repeats within the split are redrawn when ``exclude`` is
    given (the eval split)."""
    profile, rng = PROFILES[split], split_rng(seed, split)
    split_dir = out_dir / split
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    keys: set[str] = set()
    n, tries = sizes.count(split), 0
    while len(records) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"{split}: could not draw {n} distinct items (got {len(records)}); "
                               "use a larger image or fewer items")
        scene, q = sample_item(rng, profile, sizes)
        key = item_key(scene, q)
        if exclude is not None and (key in exclude or key in keys):
            continue
        keys.add(key)
        index = len(records)
        image_path = split_dir / "images" / f"{index:05d}.png"
        save_png(render_scene(scene), image_path)
        meta: dict[str, Any] = {"scene": scene, "qtype": q.qtype, "params": q.params, "split": split}
        response = None
        if profile.style:
            meta["style"] = profile.style
            slip = _noise_rng(seed, split, index)
            written = q.answer
            if slip.random() < profile.answer_noise:
                written = wrong_answer(q.answer, slip)
                meta["teacher_slip"] = written  # the answer the demonstration states (q.answer is the truth)
            response = teacher_response(scene, q, profile.style, answer=written)
        records.append(Record(
            id=f"synth-{split}-{index:05d}", images=[ImageRef(path=image_path)],
            prompt=f"{IMAGE_MARKER}\n{q.text}", answer=q.answer, source=SOURCE, meta=meta, response=response,
        ))
    write_jsonl(records, split_dir / "data.jsonl")
    return records, keys


def corpus(records: list[Record]) -> list[str]:
    """The texts the tokenizer is trained on and checked against: rendered prompts (with the
    PRISM system prompt) and responses, and the answers."""
    texts = [PRISM_SYSTEM_PROMPT]
    for rec in records:
        texts.append(render_prompt(rec))
        if rec.response is not None:
            texts.append(render_response(rec.response))
        texts.append(rec.answer or "")
    return texts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate_dataset(out_dir: str | Path, seed: int, sizes: SynthSizes | None = None, *,
                     overwrite: bool = False) -> Manifest:
    """Generates the whole task under ``out_dir``; returns (and writes) its manifest.

    ``overwrite`` removes this generator's outputs (the split folders, ``tokenizer/`` and
    ``manifest.json``) first; without it an existing output is an error, so stale images of an
    earlier, larger run never linger."""
    sizes = sizes or SynthSizes()
    out = Path(out_dir)
    owned = [out / s for s in SPLITS] + [out / "tokenizer", out / "manifest.json"]
    existing = [p for p in owned if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds generated data ({existing[0].name}); pass overwrite=True "
                              "(--overwrite) or pick another directory")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    all_records: list[Record] = []
    train_keys: set[str] = set()
    counts: dict[str, int] = {}
    for split in SPLITS:
        records, keys = make_split(out, split, seed, sizes, exclude=train_keys if split == "eval" else None)
        if split in TRAIN_SPLITS:
            train_keys |= keys
        counts[split] = len(records)
        all_records += records

    texts = corpus(all_records)
    tok = train_tokenizer(texts, sizes.vocab_size)
    check_tokenizer(tok, texts)
    save_tokenizer(tok, out / "tokenizer")

    files = {p.relative_to(out).as_posix(): _sha256(p)
             for p in sorted(out.rglob("*")) if p.is_file() and p.relative_to(out).parts[0] in
             (*SPLITS, "tokenizer")}
    manifest = Manifest(
        seed=seed, sizes=asdict(sizes), counts=counts, generator_version=GENERATOR_VERSION,
        special_token_ids=special_token_ids(), tag_token_ids={t: tok.token_to_id(t) for t in TAG_TOKENS},
        vocab_size=tok.get_vocab_size(), files=files,
    )
    # Written last and renamed into place: its presence is what says "the task is complete" (a run
    # killed while generating finds no manifest and generates again, never a half-written one).
    tmp = out / "manifest.json.tmp"
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    tmp.replace(out / "manifest.json")
    return manifest
