"""Questions about a scene, their exact answers, and the teacher's demonstrations.

Every question needs perception (what is in the image) and a little reasoning (counting,
comparing, adding). Answers are small integers or a colour word. The language is templated and
small so that a tokenizer of a few hundred tokens covers it.

The teacher knows the scene and writes a PRISM response (``chat.format_response``) in one
template for every split: the caption names the objects the question is about (:func:`caption`),
the think is the computation, the answer the result. The SFT and alignment demonstrations differ
only in fidelity (the generator's slips), never in form, so a discriminator cannot tell them
apart by their surface; it has to check the caption against the image and the answer against
the think. The template is short (at most 60 tokens with the task's tokenizer), so a policy
that imitates it fits the response budget.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from megatron_prism.data.chat import format_response
from megatron_prism.data.synth.scenes import COLORS, SHAPES, SIZES, Scene

QTYPES: dict[str, tuple[str, ...]] = {
    "shapes": ("count_color", "count_shape", "count_color_shape", "count_size", "more_than", "color_of",
               "most_color", "total"),
    "bars": ("bar_height", "top2_sum", "tallest_color", "bar_diff", "bar_total"),
    "digits": ("digit_sum", "digit_max", "digit_range", "digit_count_gt"),
}


@dataclass
class Question:
    qtype: str
    params: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    answer: str = ""


def _plural(word: str, n: int = 2) -> str:
    return word if n == 1 else word + "s"


def _join(items: list[str]) -> str:
    return ", ".join(items) if items else "none"


def _count_words(n: int) -> str:
    return "Count them: " + ", ".join(str(i) for i in range(1, n + 1)) + "."


def _matches(obj: dict[str, Any], params: dict[str, Any]) -> bool:
    return all(obj[k] == v for k, v in params.items() if k in ("color", "shape", "size"))


def _color_counts(objs: list[dict[str, Any]]) -> dict[str, int]:
    return {c: n for c in COLORS if (n := sum(o["color"] == c for o in objs))}


def _unique_max(counts: dict[str, int]) -> str | None:
    best = max(counts.values(), default=0)
    winners = [k for k, v in counts.items() if v == best]
    return winners[0] if len(winners) == 1 else None


def _text(qtype: str, p: dict[str, Any]) -> str:
    return {
        "count_color": "How many {color} shapes are there?",
        "count_shape": "How many {shape}s are there?",
        "count_color_shape": "How many {color} {shape}s are there?",
        "count_size": "How many {size} shapes are there?",
        "more_than": "How many more {a}s than {b}s are there?",
        "color_of": "What color is the {size} {shape}?",
        "most_color": "Which color has the most shapes?",
        "total": "How many shapes are there in total?",
        "bar_height": "What is the height of the {color} bar?",
        "top2_sum": "What is the sum of the two tallest bars?",
        "tallest_color": "What color is the tallest bar?",
        "bar_diff": "How much taller is the {a} bar than the {b} bar?",
        "bar_total": "What is the total height of all bars?",
        "digit_sum": "What is the sum of the digits?",
        "digit_max": "What is the largest digit?",
        "digit_range": "What is the largest digit minus the smallest digit?",
        "digit_count_gt": "How many digits are greater than {k}?",
    }[qtype].format(**p)


def solve(scene: Scene, qtype: str, params: dict[str, Any]) -> str:
    """The exact answer (the generator's own; tests re-derive it independently)."""
    objs = scene["objects"]
    if qtype in ("count_color", "count_shape", "count_color_shape", "count_size", "total"):
        return str(sum(_matches(o, params) for o in objs))
    if qtype == "more_than":
        return str(sum(o["shape"] == params["a"] for o in objs) - sum(o["shape"] == params["b"] for o in objs))
    if qtype == "color_of":
        return next(o["color"] for o in objs if _matches(o, params))
    if qtype == "most_color":
        return str(_unique_max(_color_counts(objs)))
    heights = {o["color"]: o["height"] for o in objs} if scene["kind"] == "bars" else {}
    if qtype == "bar_height":
        return str(heights[params["color"]])
    if qtype == "top2_sum":
        return str(sum(sorted(heights.values(), reverse=True)[:2]))
    if qtype == "tallest_color":
        return str(_unique_max(heights))
    if qtype == "bar_diff":
        return str(heights[params["a"]] - heights[params["b"]])
    if qtype == "bar_total":
        return str(sum(heights.values()))
    digits = [o["digit"] for o in objs]
    if qtype == "digit_sum":
        return str(sum(digits))
    if qtype == "digit_max":
        return str(max(digits))
    if qtype == "digit_range":
        return str(max(digits) - min(digits))
    if qtype == "digit_count_gt":
        return str(sum(d > params["k"] for d in digits))
    raise ValueError(f"unknown question type {qtype!r}")


def sample_question(rng: random.Random, scene: Scene, qtype: str) -> Question | None:
    """A question of ``qtype`` about ``scene``, or None when that type does not fit the scene
    (e.g. no single tallest bar)."""
    objs = scene["objects"]
    p: dict[str, Any] = {}
    if qtype == "count_color":
        p["color"] = rng.choice(objs)["color"] if rng.random() < 0.85 else rng.choice(list(COLORS))
    elif qtype == "count_shape":
        p["shape"] = rng.choice(objs)["shape"] if rng.random() < 0.85 else rng.choice(SHAPES)
    elif qtype == "count_color_shape":
        o = rng.choice(objs)
        p["color"], p["shape"] = (o["color"], o["shape"]) if rng.random() < 0.85 else \
            (rng.choice(list(COLORS)), rng.choice(SHAPES))
    elif qtype == "count_size":
        p["size"] = rng.choice(SIZES)
    elif qtype == "more_than":
        a, b = rng.sample(SHAPES, 2)
        na, nb = (sum(o["shape"] == s for o in objs) for s in (a, b))
        p["a"], p["b"] = (a, b) if na >= nb else (b, a)
    elif qtype == "color_of":
        pairs = sorted({(o["size"], o["shape"]) for o in objs})
        unique = [sp for sp in pairs if sum((o["size"], o["shape"]) == sp for o in objs) == 1]
        if not unique:
            return None
        p["size"], p["shape"] = rng.choice(unique)
    elif qtype == "most_color":
        if _unique_max(_color_counts(objs)) is None:
            return None
    elif qtype == "bar_height":
        p["color"] = rng.choice(objs)["color"]
    elif qtype == "top2_sum" and len(objs) < 2:
        return None
    elif qtype == "tallest_color":
        if _unique_max({o["color"]: o["height"] for o in objs}) is None:
            return None
    elif qtype == "bar_diff":
        pairs = [(x, y) for x in objs for y in objs if x["height"] > y["height"]]
        if not pairs:
            return None
        x, y = rng.choice(pairs)
        p["a"], p["b"] = x["color"], y["color"]
    elif qtype == "digit_count_gt":
        p["k"] = rng.randint(1, 7)
    elif qtype not in QTYPES[scene["kind"]]:
        raise ValueError(f"question type {qtype!r} does not apply to {scene['kind']} scenes")
    return Question(qtype=qtype, params=p, text=_text(qtype, p), answer=solve(scene, qtype, p))


# ----------------------------------------------------------------------------- demonstrations

def _shape_name(o: dict[str, Any], size: bool = True) -> str:
    return f"{o['size']} {o['color']} {o['shape']}" if size else f"{o['color']} {o['shape']}"


def caption(scene: Scene, q: Question) -> str:
    """The caption of the task's template: the objects (and attributes) the question is about."""
    objs, p, t = scene["objects"], q.params, q.qtype
    if t == "count_color":
        return f"{p['color']} shapes: {_join([o['shape'] for o in objs if _matches(o, p)])}."
    if t == "count_shape":
        return f"{p['shape']}s: {_join([o['color'] for o in objs if _matches(o, p)])}."
    if t == "count_color_shape":
        return f"{p['color']} {p['shape']}s: {_join([o['size'] for o in objs if _matches(o, p)])}."
    if t == "count_size":
        return f"{p['size']} shapes: {_join([_shape_name(o, False) for o in objs if _matches(o, p)])}."
    if t == "more_than":
        return " ".join(f"{s}s: {_join([o['color'] for o in objs if o['shape'] == s])}." for s in (p["a"], p["b"]))
    if t == "color_of":
        return f"the {p['size']} {p['shape']} is {q.answer}."
    if t == "most_color":
        return "colors: " + ", ".join(f"{c} {n}" for c, n in _color_counts(objs).items()) + "."
    if t == "total":
        return "shapes: " + ", ".join(_shape_name(o, False) for o in objs) + "."
    if t == "bar_height":
        return f"the {p['color']} bar is {q.answer} high."
    if t == "top2_sum":
        top = sorted(objs, key=lambda o: -o["height"])[:2]
        return "tallest bars: " + ", ".join(f"{o['color']} {o['height']}" for o in top) + "."
    if t in ("tallest_color", "bar_total"):
        return "bars: " + ", ".join(f"{o['color']} {o['height']}" for o in objs) + "."
    if t == "bar_diff":
        h = {o["color"]: o["height"] for o in objs}
        return f"{p['a']} bar {h[p['a']]}, {p['b']} bar {h[p['b']]}."
    return "digits: " + ", ".join(str(o["digit"]) for o in objs) + "."


def _core_steps(scene: Scene, q: Question) -> str:
    """The think: the computation from what the caption saw."""
    objs, p, t, a = scene["objects"], q.params, q.qtype, q.answer
    if t in ("count_color", "count_shape", "count_color_shape", "count_size", "total"):
        n = int(a)
        return f"{_count_words(n)} So there {'is' if n == 1 else 'are'} {a}." if n else "There are none. So there are 0."
    if t == "more_than":
        na, nb = (sum(o["shape"] == s for o in objs) for s in (p["a"], p["b"]))
        return f"There are {na} {_plural(p['a'], na)} and {nb} {_plural(p['b'], nb)}. {na} - {nb} = {a}."
    if t == "color_of":
        return f"There is one {p['size']} {p['shape']} and it is {a}."
    if t == "most_color":
        counts = _color_counts(objs)
        return ", ".join(f"{c} {n}" for c, n in counts.items()) + f". The most is {a} with {counts[a]}."
    h = {o["color"]: o["height"] for o in objs} if scene["kind"] == "bars" else {}
    if t == "bar_height":
        return f"The {p['color']} bar reaches {a}."
    if t == "top2_sum":
        top = sorted(h.values(), reverse=True)[:2]
        return f"The two tallest are {top[0]} and {top[1]}. {top[0]} + {top[1]} = {a}."
    if t == "tallest_color":
        return f"{h[a]} is the largest height, so the tallest bar is {a}."
    if t == "bar_diff":
        return f"{h[p['a']]} - {h[p['b']]} = {a}."
    if t == "bar_total":
        return " + ".join(str(v) for v in h.values()) + f" = {a}."
    digits = [o["digit"] for o in objs]
    if t == "digit_sum":
        return " + ".join(map(str, digits)) + f" = {a}."
    if t == "digit_max":
        return f"The largest of {', '.join(map(str, digits))} is {a}."
    if t == "digit_range":
        return f"The largest is {max(digits)} and the smallest is {min(digits)}. {max(digits)} - {min(digits)} = {a}."
    big = [str(d) for d in digits if d > p["k"]]
    if not big:
        return f"No digit is greater than {p['k']}. So 0."
    verb = "is" if len(big) == 1 else "are"
    return f"{', '.join(big)} {verb} greater than {p['k']}. So {a}."


def applies(scene: Scene, q: Question) -> bool:
    """Whether ``q`` is still a well-posed question about ``scene`` (the conditions
    :func:`sample_question` draws under): one object named by ``color_of``, a single most frequent
    colour or tallest bar, a taller first bar, no fewer of the first shape."""
    objs, p, t = scene["objects"], q.params, q.qtype
    if t == "color_of":
        return sum(_matches(o, p) for o in objs) == 1
    if t == "most_color":
        return _unique_max(_color_counts(objs)) is not None
    if t == "tallest_color":
        return _unique_max({o["color"]: o["height"] for o in objs}) is not None
    heights = {o["color"]: o["height"] for o in objs} if scene["kind"] == "bars" else {}
    if t == "bar_diff":
        return heights[p["a"]] > heights[p["b"]]
    if t == "more_than":
        return sum(o["shape"] == p["a"] for o in objs) >= sum(o["shape"] == p["b"] for o in objs)
    return True


def teacher_response(scene: Scene, q: Question, answer: str | None = None) -> str:
    """The teacher's demonstration in PRISM's ``<caption><think><answer>`` layout; ``answer``
    replaces the true answer in the ``<answer>`` part (a teacher's slip)."""
    return format_response(caption(scene, q), _core_steps(scene, q), q.answer if answer is None else answer)
