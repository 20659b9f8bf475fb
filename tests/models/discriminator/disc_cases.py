"""Inputs shared by the discriminator tests: a token -> bytes table for the tiny model's vocabulary
(ids 240..245 are the six tags, 246 a space, 247 ``<|im_end|>``, vision tokens 250..253), rows with
images, and a launcher for the torchrun worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_prism.models.discriminator.batch import ScoreItem, VisionTokens, make_score_batch
from megatron_prism.models.discriminator.parts import PartFinder
from megatron_prism.models.qwen3vl.tiny import TOKENS

IMG, VS, VE = TOKENS["image_token_id"], TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]
CAP, CAP_, THINK, THINK_, ANS, ANS_, SPACE, IM_END = range(240, 248)
PATCH_DIM = 3 * 2 * 4 * 4
VISION = VisionTokens(IMG, TOKENS["video_token_id"], 2)
WORKER = Path(__file__).with_name("disc_worker.py")
REPO = Path(__file__).resolve().parents[3]


def tiny_finder() -> PartFinder:
    table = [bytes([97 + i % 26]) for i in range(240)]
    table += [b"<caption>", b"</caption>", b"<think>", b"</think>", b"<answer>", b"</answer>", b" ", b""]
    table += [b""] * (256 - len(table))
    return PartFinder(table)


def response(gen: torch.Generator, cap: int, think: int, ans: int) -> list[int]:
    def words(n):
        return torch.randint(0, 240, (n,), generator=gen).tolist()

    return [CAP, *words(cap), CAP_, SPACE, THINK, *words(think), THINK_, ANS, *words(ans), ANS_, IM_END]


def prompt(gen: torch.Generator, grids: list[list[int]]) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    ids = torch.randint(0, 240, (3,), generator=gen).tolist()
    for t, h, w in grids:
        ids += [VS] + [IMG] * (t * h * w // 4) + [VE] + torch.randint(0, 240, (2,), generator=gen).tolist()
    if not grids:
        return ids, None, None
    thw = torch.tensor(grids)
    return ids, torch.randn(int(thw.prod(-1).sum()), PATCH_DIM, generator=gen), thw


def items(seed: int = 0) -> list[ScoreItem]:
    """Four rows: two images of different grids, one image, text only, and a malformed response."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for grids, (c, t, a) in (([[1, 4, 4], [1, 2, 6]], (3, 5, 1)), ([[1, 4, 2]], (6, 2, 2)), ([], (2, 3, 1))):
        p, pix, thw = prompt(gen, grids)
        rows.append(ScoreItem(p, response(gen, c, t, a), pix, thw))
    p, pix, thw = prompt(gen, [[1, 2, 2]])
    bad = response(gen, 2, 2, 1)
    bad.remove(THINK_)  # missing </think>
    rows.append(ScoreItem(p, bad, pix, thw))
    return rows


def batch(seed: int = 0, multiple_of: int = 2, **kw):
    return make_score_batch(items(seed), tiny_finder(), VISION, pad_id=0, multiple_of=multiple_of, **kw)


def run_worker(nproc: int, ckpt: Path, inputs: Path, out: Path, *flags: str, timeout: int = 300) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), "--ckpt", str(ckpt), "--inputs", str(inputs), "--out", str(out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({' '.join(flags)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
