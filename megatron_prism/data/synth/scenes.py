"""Scenes of the embedded task: what is in an image (as plain JSON) and how it is drawn.

Three kinds, each a dict ``{"kind", "width", "height", "cell", "objects"}`` that is stored in the
record's ``meta`` so the answer can be re-derived from it:

* ``shapes``: circles, squares and triangles of several colours and two sizes;
  objects ``{"shape", "color", "size", "row", "col"}``.
* ``bars``: a bar chart, one bar per column, distinct colours;
  objects ``{"color", "height", "col"}`` (height in units of ``unit`` = cell/2 pixels, from 1 up to
  ``min(9, image height / unit - 1)``: 1..7 for the default 128 px high images with 32 px cells).
* ``digits``: seven-segment digits (drawn with rectangles, no font, so rendering does not depend
  on the fonts of the machine); objects ``{"digit", "row", "col"}``.

The image is a grid of ``cell`` x ``cell`` squares (the generator's default 32 = one merged vision
token: 2x2 patches of 16 px) and every object sits inside one cell, so each vision token sees one
object at most: this keeps perception learnable for a tiny model. Objects are listed in reading order (row, then column). Drawing uses
no anti-aliasing and PNGs are written with fixed parameters, so the bytes are reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

Scene = dict[str, Any]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SCENE_KINDS = ("shapes", "bars", "digits")
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MAX_BAR = 9  # bar heights are single digits

# Seven-segment layout: which segments each digit lights (a top, b top right, c bottom right,
# d bottom, e bottom left, f top left, g middle).
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc",
            7: "abc", 8: "abcdefg", 9: "abcdfg"}


def grid_shape(width: int, height: int, cell: int) -> tuple[int, int]:
    """(rows, cols) of the cell grid of an image."""
    rows, cols = height // cell, width // cell
    if rows < 2 or cols < 2:
        raise ValueError(f"image {width}x{height} is too small for cells of {cell} px (need at least 2x2 cells)")
    return rows, cols


def _cells(rng: random.Random, rows: int, cols: int, n: int) -> list[tuple[int, int]]:
    """``n`` distinct cells in reading order."""
    picked = rng.sample(range(rows * cols), n)
    return [(i // cols, i % cols) for i in sorted(picked)]


def shapes_scene(rng: random.Random, width: int, height: int, n_range: tuple[int, int], cell: int = 16) -> Scene:
    """Between ``n_range[0]`` and ``n_range[1]`` shapes, one per cell."""
    rows, cols = grid_shape(width, height, cell)
    n = rng.randint(min(n_range[0], rows * cols), min(n_range[1], rows * cols))
    objects = [{"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": rng.choice(SIZES),
                "row": r, "col": c} for r, c in _cells(rng, rows, cols, n)]
    return {"kind": "shapes", "width": width, "height": height, "cell": cell, "objects": objects}


def bar_unit(cell: int) -> int:
    """Pixels per unit of bar height: half a cell, so a patch spans two units."""
    return max(1, cell // 2)


def bars_scene(rng: random.Random, width: int, height: int, n_range: tuple[int, int], cell: int = 16) -> Scene:
    """A bar chart of distinct colours, bars in the leftmost columns, heights 1..max."""
    _, cols = grid_shape(width, height, cell)
    max_bars = min(cols, len(COLORS))
    n = rng.randint(min(n_range[0], max_bars), min(n_range[1], max_bars))
    top = min(MAX_BAR, height // bar_unit(cell) - 1)  # the top unit stays empty
    colors = rng.sample(list(COLORS), n)
    objects = [{"color": c, "height": rng.randint(1, top), "col": i} for i, c in enumerate(colors)]
    return {"kind": "bars", "width": width, "height": height, "cell": cell, "unit": bar_unit(cell), "objects": objects}


def digits_scene(rng: random.Random, width: int, height: int, n_range: tuple[int, int], cell: int = 16) -> Scene:
    """Seven-segment digits 0..9, one per cell."""
    rows, cols = grid_shape(width, height, cell)
    n = rng.randint(min(n_range[0], rows * cols), min(n_range[1], rows * cols))
    objects = [{"digit": rng.randint(0, 9), "row": r, "col": c} for r, c in _cells(rng, rows, cols, n)]
    return {"kind": "digits", "width": width, "height": height, "cell": cell, "objects": objects}


SCENE_MAKERS = {"shapes": shapes_scene, "bars": bars_scene, "digits": digits_scene}


def _draw_shape(draw: ImageDraw.ImageDraw, obj: dict[str, Any], cell: int) -> None:
    cx, cy = obj["col"] * cell + cell // 2, obj["row"] * cell + cell // 2
    half = round(cell * 0.44) if obj["size"] == "large" else round(cell * 0.25)
    fill = COLORS[obj["color"]]
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    if obj["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half - 1, cy + half - 1), (cx - half, cy + half - 1)], fill=fill)


def _draw_digit(draw: ImageDraw.ImageDraw, obj: dict[str, Any], cell: int) -> None:
    x0, y0 = obj["col"] * cell, obj["row"] * cell
    left, right = x0 + cell // 4, x0 + cell - cell // 4 - 1
    top, bottom = y0 + cell // 8, y0 + cell - cell // 8 - 1
    mid, s = (top + bottom) // 2, max(1, cell // 8)
    rects = {
        "a": (left, top, right, top + s - 1), "d": (left, bottom - s + 1, right, bottom),
        "g": (left, mid - s // 2, right, mid - s // 2 + s - 1),
        "f": (left, top, left + s - 1, mid), "b": (right - s + 1, top, right, mid),
        "e": (left, mid, left + s - 1, bottom), "c": (right - s + 1, mid, right, bottom),
    }
    for seg in SEGMENTS[obj["digit"]]:
        draw.rectangle(rects[seg], fill=INK)


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of a scene."""
    img = Image.new("RGB", (scene["width"], scene["height"]), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = scene["cell"]
    if scene["kind"] == "shapes":
        for obj in scene["objects"]:
            _draw_shape(draw, obj, cell)
    elif scene["kind"] == "bars":
        unit, base = scene["unit"], scene["height"] - 1
        margin = max(1, cell // 6)
        for obj in scene["objects"]:
            x0 = obj["col"] * cell + margin
            draw.rectangle((x0, base - obj["height"] * unit + 1, obj["col"] * cell + cell - margin - 1, base),
                           fill=COLORS[obj["color"]])
    elif scene["kind"] == "digits":
        for obj in scene["objects"]:
            _draw_digit(draw, obj, cell)
    else:
        raise ValueError(f"unknown scene kind {scene['kind']!r}")
    return img


def save_png(img: Image.Image, path: Path) -> None:
    """PNG with fixed encoder settings and no metadata (reproducible bytes)."""
    img.save(path, format="PNG", optimize=False, compress_level=6)


def scene_key(scene: Scene) -> str:
    """Canonical text of what is in a scene (for de-duplication)."""
    return json.dumps({"kind": scene["kind"], "objects": scene["objects"]}, sort_keys=True, separators=(",", ":"))
