"""Qwen3-VL image preprocessing, ours: resize to the patch grid, normalise, patchify.

The vision tower sees an image as a grid of ``patch x patch`` pixel squares, ``merge x merge`` of
which become one LM token. So an image is resized (bicubic, aspect ratio kept as well as the grid
allows) to sides that are multiples of ``patch * merge`` with a pixel count within
``[min_pixels, max_pixels]``, scaled to [0, 1], normalised with the model's mean/std, repeated
``temporal_patch`` times (a still image is a one-frame video), and flattened to
``pixel_values [h/p * w/p, 3 * temporal * p * p]`` with patches ordered merge-window by
merge-window, which is the order the tower's patch merger expects. ``grid_thw = (1, h/p, w/p)``.

Checked against transformers' Qwen2-VL/Qwen3-VL PIL image processor (``tests/data``). The settings
of a model directory come from its ``preprocessor_config.json`` when it has one
(:func:`settings_for_model`), as transformers' ``AutoImageProcessor`` reads them.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megatron_prism.data.records import ImageRef, RecordError


@dataclass(frozen=True)
class ImageSettings:
    """Qwen3-VL's defaults (preprocessor_config.json of the released checkpoints)."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 64 * 32 * 32  # 65536
    max_pixels: int = 16384 * 32 * 32  # 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _from_preprocessor(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The fields of an HF Qwen2-VL/Qwen3-VL ``preprocessor_config.json`` that ImageSettings has.
    Pixel bounds are ``size.shortest_edge``/``size.longest_edge`` (Qwen3-VL) or ``min_pixels``/
    ``max_pixels`` (Qwen2-VL); both name a pixel count, not an edge length."""
    out: dict[str, Any] = {}
    size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
    for key, value in (("patch_size", raw.get("patch_size")), ("merge_size", raw.get("merge_size")),
                       ("temporal_patch_size", raw.get("temporal_patch_size")),
                       ("min_pixels", raw.get("min_pixels", size.get("shortest_edge"))),
                       ("max_pixels", raw.get("max_pixels", size.get("longest_edge")))):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecordError(f"{path}: {key} must be a positive integer, got {value!r}; fix or delete the file")
        out[key] = value
    for key in ("image_mean", "image_std"):
        value = raw.get(key)
        if value is None:
            continue
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise RecordError(f"{path}: {key} must be three numbers, got {value!r}")
        out[key] = tuple(float(v) for v in value)
    return out


def settings_for_model(model_dir: str | Path, *, patch_size: int, merge_size: int, temporal_patch_size: int,
                       min_pixels: int | None = None, max_pixels: int | None = None) -> ImageSettings:
    """The image settings of a model directory: its ``preprocessor_config.json`` when present
    (pixel bounds, patch/merge sizes, mean/std), else Qwen3-VL's defaults; the vision tower's sizes
    (``config.json``) must agree with the file, and ``min_pixels``/``max_pixels`` given here (the
    run's ``data.min_pixels``/``data.max_pixels``) override the file's bounds."""
    path = Path(model_dir) / PREPROCESSOR_CONFIG
    fields: dict[str, Any] = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(f"{path}: not valid JSON ({exc}); re-download it or delete it") from None
        fields = _from_preprocessor(raw if isinstance(raw, dict) else {}, path)
        tower = {"patch_size": patch_size, "merge_size": merge_size, "temporal_patch_size": temporal_patch_size}
        clash = {k: (fields[k], v) for k, v in tower.items() if k in fields and fields[k] != v}
        if clash:
            what = ", ".join(f"{k} {a} (config.json: {b})" for k, (a, b) in clash.items())
            raise RecordError(f"{path}: {what} disagrees with the model's vision tower; the two files are from "
                              "different checkpoints")
    settings = replace(ImageSettings(), **{**fields, "patch_size": patch_size, "merge_size": merge_size,
                                           "temporal_patch_size": temporal_patch_size})
    if min_pixels is not None:
        settings = replace(settings, min_pixels=min_pixels)
    if max_pixels is not None:
        settings = replace(settings, max_pixels=max_pixels)
    if settings.max_pixels < settings.min_pixels:
        raise RecordError(f"image pixel bounds {settings.min_pixels} > {settings.max_pixels} (data.min_pixels / "
                          f"data.max_pixels or {path}); make max_pixels at least min_pixels")
    return settings


def grid_size(height: int, width: int, s: ImageSettings) -> tuple[int, int]:
    """Resized (height, width): multiples of ``patch * merge``, pixel count in range, aspect kept."""
    if min(height, width) <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    f = s.factor
    # A side shorter than half a factor rounds to 0 here, as in transformers' smart_resize (which
    # rollout engines use): the product is then below min_pixels and the image is scaled up.
    h = round(height / f) * f
    w = round(width / f) * f
    if h * w > s.max_pixels:
        shrink = math.sqrt(height * width / s.max_pixels)
        h = max(f, math.floor(height / shrink / f) * f)
        w = max(f, math.floor(width / shrink / f) * f)
    elif h * w < s.min_pixels:
        grow = math.sqrt(s.min_pixels / (height * width))
        h = math.ceil(height * grow / f) * f
        w = math.ceil(width * grow / f) * f
    return h, w


def load_image(ref: ImageRef, where: str) -> Image.Image:
    """Opens and fully decodes an image as RGB; a missing or corrupt file is a RecordError."""
    try:
        if ref.path is not None:
            with Image.open(ref.path) as img:
                img.load()
                return img.convert("RGB")
        with Image.open(io.BytesIO(ref.data or b"")) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise RecordError(f"{where}: image {ref.describe()} does not exist; restore it or drop the record") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise RecordError(f"{where}: image {ref.describe()} cannot be decoded ({exc}); replace or drop it") from None


def patchify(image: Image.Image, s: ImageSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One RGB image -> (pixel_values [N, 3 * T * p * p] float32, grid (1, h/p, w/p))."""
    h, w = grid_size(image.height, image.width, s)
    resized = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)  # [3, h, w]
    mean = np.asarray(s.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(s.image_std, dtype=np.float32)[:, None, None]
    x = (x - mean) / std
    p, m, t = s.patch_size, s.merge_size, s.temporal_patch_size
    gh, gw = h // p, w // p
    # [c, gh/m, m, p, gw/m, m, p] -> [gh/m, gw/m, m, m, c, p, p]: merge windows outermost
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image: T equal frames
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * t * p * p)), (1, gh, gw)


def unpatchify(pixel_values: torch.Tensor, grid_thw: Sequence[int], s: ImageSettings) -> Image.Image:
    """The resized RGB image :func:`patchify` made ``pixel_values`` from, exactly (its uint8
    pixels are recovered by undoing the normalisation and rounding). For engines that take
    images rather than pixel values (vLLM) and would otherwise resize the original themselves."""
    t, gh, gw = (int(v) for v in grid_thw)
    p, m, tp = s.patch_size, s.merge_size, s.temporal_patch_size
    if t != 1 or pixel_values.shape != (gh * gw, 3 * tp * p * p):
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match one still image of grid {grid_thw}")
    x = pixel_values.detach().to("cpu", torch.float64).numpy().reshape(gh // m, gw // m, m, m, 3, tp, p, p)[:, :, :, :, :, 0]
    x = x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)  # undo patchify's merge-window order
    mean = np.asarray(s.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(s.image_std, dtype=np.float64)[:, None, None]
    rgb = np.clip(np.rint((x * std + mean) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def process_images(refs: list[ImageRef], s: ImageSettings, where: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """All images of a record -> (pixel_values [sum N, D], image_grid_thw [n, 3]) or (None, None)."""
    if not refs:
        return None, None
    patches, grids = [], []
    for ref in refs:
        try:
            pv, grid = patchify(load_image(ref, where), s)
        except ValueError as exc:
            if isinstance(exc, RecordError):
                raise
            raise RecordError(f"{where}: image {ref.describe()}: {exc}") from None
        patches.append(pv)
        grids.append(grid)
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


def tokens_per_image(grid_thw: torch.Tensor, s: ImageSettings) -> list[int]:
    """LM tokens (image pads) each image occupies: ``t * h * w / merge^2``."""
    return [int(g.prod()) // (s.merge_size**2) for g in grid_thw]
