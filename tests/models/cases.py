"""Inputs for Qwen3-VL parity tests and a launcher for the torchrun worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron_prism.models.qwen3vl.tiny import TOKENS

IMG, VS, VE = TOKENS["image_token_id"], TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]
PATCH_DIM = 3 * 2 * 4 * 4  # channels * temporal patch * patch * patch of the tiny configs
WORKER = Path(__file__).resolve().parents[1] / "distributed" / "worker.py"
REPO = Path(__file__).resolve().parents[2]


def demonstration(gen: torch.Generator, name: str, grids: list[list[int]], prompt_len: int, response_len: int):
    """A random SFT demonstration (``DemonstrationInputs``) with images of ``grids``: prompt tokens,
    a vision block per image, response tokens; labels only on the response."""
    from megatron_prism.data.processing import IGNORE_INDEX, DemonstrationInputs
    from megatron_prism.data.records import Record

    ids = torch.randint(0, 240, (prompt_len,), generator=gen).tolist()
    for t, h, w in grids:
        ids += [VS] + [IMG] * (t * h * w // 4) + [VE]
    prompt_length = len(ids)
    ids += torch.randint(0, 240, (response_len,), generator=gen).tolist()
    input_ids = torch.tensor(ids)
    labels = input_ids.clone()
    labels[:prompt_length] = IGNORE_INDEX
    thw = torch.tensor(grids) if grids else None
    pixels = torch.randn(int(thw.prod(-1).sum()), PATCH_DIM, generator=gen) if grids else None
    return DemonstrationInputs(Record(id=name, prompt="-"), input_ids, pixels, thw, labels=labels,
                               prompt_length=prompt_length)


def _sample(gen: torch.Generator, grids, pre=3, mid=2, post=4) -> list[int]:
    ids = torch.randint(0, 240, (pre,), generator=gen).tolist()
    for t, h, w in grids:
        ids += [VS] + [IMG] * (t * h * w // 4) + [VE] + torch.randint(0, 240, (mid,), generator=gen).tolist()
    return ids + torch.randint(0, 240, (post,), generator=gen).tolist()


def make_case(
    batch_grids: list[list[list[int]]], seed: int, pad_side: str = "left", multiple_of: int = 1, length: int = 0
) -> dict:
    """A batch: per sample a list of image grids [t, h, w] (patch units), padded to equal length
    (at least ``length``, rounded up to ``multiple_of``)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [_sample(gen, g) for g in batch_grids]
    length = -(-max(max(map(len, seqs)), length) // multiple_of) * multiple_of
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if pad_side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    case: dict = {"input_ids": ids}
    if not bool(mask.all()):
        case["attention_mask"] = mask
    grids = [g for gs in batch_grids for g in gs]
    if grids:
        thw = torch.tensor(grids)
        case["image_grid_thw"] = thw
        case["pixel_values"] = torch.randn(int(thw.prod(-1).sum()), PATCH_DIM, generator=gen)
    return case


def standard_cases(seed: int = 0, multiple_of: int = 1) -> dict[str, dict]:
    """The four situations the issue names: text only, one image, two images of different grids
    in one sequence, and a padded batch mixing them (lengths padded to ``multiple_of``)."""
    return {
        "text": make_case([[], []], seed, multiple_of=multiple_of),
        "one_image": make_case([[[1, 4, 4]]], seed + 1, multiple_of=multiple_of),
        "two_images": make_case([[[1, 4, 4], [1, 6, 2]]], seed + 2, multiple_of=multiple_of),
        "padded_batch": make_case([[[1, 4, 4]], [[1, 2, 6], [1, 4, 2]], []], seed + 3, "left", multiple_of),
    }


def hf_logits(hf_model, case: dict) -> torch.Tensor:
    kwargs = {k: case[k] for k in ("attention_mask", "pixel_values", "image_grid_thw") if k in case}
    with torch.no_grad():
        return hf_model(input_ids=case["input_ids"], mm_token_type_ids=(case["input_ids"] == IMG).int(), **kwargs).logits


def assert_logp_entropy_match(got: torch.Tensor, hf_model, case: dict, tol: float = 1e-4) -> None:
    """``got`` = [masked target log-probs, entropy] of the training head against float64
    log_softmax and entropy of transformers' logits over the model's (real) vocabulary."""
    from megatron_prism.models.common.token_logprobs import next_token_targets

    logits = hf_logits(hf_model, case).double()
    targets = next_token_targets(case["input_ids"], case.get("attention_mask"))
    mask = targets != -100
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(got[0].double(), logp, rtol=tol, atol=tol)
    torch.testing.assert_close(got[1].double()[mask], entropy[mask], rtol=tol, atol=tol)


def relative_error(out: torch.Tensor, ref: torch.Tensor, case: dict) -> float:
    keep = case.get("attention_mask", torch.ones(ref.shape[:2], dtype=torch.long)).bool()
    return float((out[keep] - ref[keep]).abs().max() / ref[keep].abs().max())


def run_worker(nproc: int, mode: str, ckpt: Path, inputs: Path, out: Path, *flags: str, timeout: int = 420) -> None:
    """torchrun the worker; raise with its output when it fails."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(WORKER), mode, "--ckpt", str(ckpt), "--inputs", str(inputs), "--out", str(out), *flags,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({' '.join(flags)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
