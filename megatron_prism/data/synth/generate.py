"""Writes the embedded task: four splits of records + images, a tokenizer, and a manifest.

Layout of ``out_dir``::

    sft/data.jsonl    sft/images/00000.png ...    demonstrations with the teacher's slips: 30 % end in
                                                  a wrong answer after a right caption and think, 15 %
                                                  misperceive one object (caption, think and answer
                                                  follow the misperceived scene)
    align/data.jsonl  align/images/...            demonstrations without slips
    rl/data.jsonl     rl/images/...               answers only
    eval/data.jsonl   eval/images/...             answers only, none equal to a training item
    tokenizer/        tokenizer.json, tokenizer_config.json, special_tokens_map.json
    manifest.json     seed, sizes, counts, generator version, special token ids, sha256 per file

Every split draws its items from one distribution and every demonstration has one template
(:func:`questions.teacher_response`): SFT and alignment demonstrations differ only in fidelity, as
PRISM's SFT corpus and its high-fidelity alignment set do, and the alignment items come from the
distribution of the held-out ones. Every demonstration fits ``SynthSizes.max_response_tokens``
(the ALIGN response budget, its end token included); the generator refuses to write one that does
not, naming it.

Each split draws from its own ``random.Random`` seeded from (seed, split name), so a split does not
change when another split's size does (eval excepted: it skips items seen in training). Nothing
written depends on time or machine, so one seed gives byte-identical trees.

Default sizes (sft 2000, align 500, rl 1000, eval 200, 128x128 images): a tiny model (hidden 64,
4 layers) sees the whole SFT split in a few hundred steps of batch 16 on a CPU; alignment holds a
quarter as much (as PRISM's alignment set is smaller than its SFT set); RL needs prompts for a few
hundred rollout steps; 200 eval items give accuracy to +-3.5 points (one standard error at 50 %).
The image is a 4x4 grid of 32-pixel cells; with patch 16 and merge 2 each cell is one of the 16
merged vision tokens, so every object has a token of its own and perception is learnable.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_prism.data.budget import check_response_budget
from megatron_prism.data.chat import PRISM_SYSTEM_PROMPT, render_prompt, render_response
from megatron_prism.data.records import IMAGE_MARKER, ImageRef, Record, write_jsonl
from megatron_prism.data.synth.questions import QTYPES, Question, applies, caption, sample_question, solve, teacher_response
from megatron_prism.data.synth.scenes import (COLORS, MAX_BAR, SCENE_MAKERS, SHAPES, SIZES, Scene, render_scene,
                                             save_png, scene_key)
from megatron_prism.data.synth.tokenizer import (DEFAULT_VOCAB_SIZE, TAG_TOKENS, check_tokenizer,
                                                 save_tokenizer, special_token_ids, train_tokenizer)

GENERATOR_VERSION = "prism-synth-3"
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
    width: int = 128
    height: int = 128
    cell: int = 32  # grid cell in pixels; keep it one merged vision token (patch 16 x merge 2)
    vocab_size: int = DEFAULT_VOCAB_SIZE
    max_response_tokens: int = 64  # every demonstration, its end token included, fits this (the ALIGN budget)

    def count(self, split: str) -> int:
        return int(getattr(self, split))


@dataclass
class SplitProfile:
    """What a split holds: its items' distribution, whether it has demonstrations, their slips."""

    demonstrations: bool
    n_objects: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"shapes": (2, 7), "bars": (3, 5), "digits": (2, 4)})  # scene kind -> (min, max) objects
    kind_weights: dict[str, float] = field(default_factory=lambda: {"shapes": 2.0, "bars": 1.0, "digits": 1.0})
    qtype_weights: dict[str, float] = field(default_factory=dict)  # default weight 1
    # Fraction of demonstrations whose final answer is wrong although caption and reasoning are
    # right, as in public SFT corpora (transcription slips, mislabelled items). Imitation copies
    # the slip; a verifiable reward (RLVR) and high-fidelity demonstrations (ALIGN) correct it.
    answer_noise: float = 0.0
    # Fraction whose caption misperceives one object (another colour, shape, size, height or
    # digit); the think and answer are right for the misperceived scene, as a teacher that misread
    # the image writes them. Exclusive of the answer slips.
    caption_noise: float = 0.0


# One item distribution for every split: the splits differ in what they hold, never in what they ask.
PROFILES: dict[str, SplitProfile] = {
    "sft": SplitProfile(True, answer_noise=0.3, caption_noise=0.15),
    "align": SplitProfile(True),
    "rl": SplitProfile(False),
    "eval": SplitProfile(False),
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


def misperceive(scene: Scene, q: Question, rng: random.Random, tries: int = 20) -> Scene | None:
    """The scene with one object misread (another colour, shape, size, bar height or digit) such
    that the question's caption changes and the question still applies; None when no such misreading
    is found in ``tries`` draws."""
    top = min(MAX_BAR, scene["height"] // scene.get("unit", 1) - 1) if scene["kind"] == "bars" else 0
    for _ in range(tries):
        seen = json.loads(json.dumps(scene))
        obj = rng.choice(seen["objects"])
        if scene["kind"] == "shapes":
            attr = rng.choice(("color", "shape", "size"))
            choices = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[attr]
            obj[attr] = rng.choice([v for v in choices if v != obj[attr]])
        elif scene["kind"] == "bars":
            height = min(top, max(1, obj["height"] + rng.choice((-1, 1))))
            if height == obj["height"]:
                continue
            obj["height"] = height
        else:
            obj["digit"] = rng.choice([d for d in range(10) if d != obj["digit"]])
        if applies(seen, q) and caption(seen, misread(seen, q)) != caption(scene, q):
            return seen
    return None


def misread(seen: Scene, q: Question) -> Question:
    """``q`` with the answer it has in the scene as (mis)seen."""
    return Question(q.qtype, q.params, q.text, solve(seen, q.qtype, q.params))


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


def demonstration(scene: Scene, q: Question, meta: dict[str, Any], slip: random.Random, profile: SplitProfile) -> str:
    """The teacher's demonstration of an item, with the profile's slips drawn from ``slip``; what
    went wrong is recorded in ``meta`` (``teacher_slip``: the answer it states; ``caption_slip``:
    the scene it saw), so readouts and tests know the truth."""
    u = slip.random()
    if u < profile.answer_noise:
        written = wrong_answer(q.answer, slip)
        meta["teacher_slip"] = written  # the answer the demonstration states (q.answer is the truth)
        return teacher_response(scene, q, answer=written)
    if u < profile.answer_noise + profile.caption_noise:
        seen = misperceive(scene, q, slip)
        if seen is not None:
            meta["caption_slip"] = seen
            return teacher_response(seen, misread(seen, q))
    return teacher_response(scene, q)


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
        if profile.demonstrations:
            response = demonstration(scene, q, meta, _noise_rng(seed, split, index), profile)
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
                     overwrite: bool = False, budget_setting: str = "max_response_tokens") -> Manifest:
    """Generates the whole task under ``out_dir``; returns (and writes) its manifest.

    A demonstration longer than ``sizes.max_response_tokens`` (end token included) is an error
    naming it; ``budget_setting`` is the name of that budget in the error's fix (the pipeline
    passes the config key it comes from).

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
    check_response_budget(((f"{out / rec.meta['split'] / 'data.jsonl'}:{rec.id}", render_response(rec.response))
                           for rec in all_records if rec.response is not None),
                          lambda text: len(tok.encode(text, add_special_tokens=False).ids), sizes.max_response_tokens,
                          where=str(out), setting=budget_setting)
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
