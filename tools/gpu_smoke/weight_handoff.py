#!/usr/bin/env python
"""GPU smoke section "weight_handoff": what one GPU with no network can check of the SGLang sync path.

    python tools/gpu_smoke/weight_handoff.py OUT_DIR [--device cuda] [--layers 2]

Writes OUT_DIR/weight_handoff.json and appends a summary to OUT_DIR/log.txt (the tools/gpu_smoke
layout). SGLang itself is too large to bring to a GPU machine without network access, so this
hands buckets to a child process the way the adapter hands them to SGLang's scheduler:

1. **bit-exact**: a mixed-dtype bucket (bf16 + fp32, odd sizes) packed by ``weight_sync.flatten
   (as_bytes=True)`` (SGLang 0.5.23's ``FlattenedTensorBucket`` layout), sent through a
   ``torch.multiprocessing`` queue (a CUDA-IPC handle on a GPU), rebuilt in the child with
   ``FlatBucket.unflatten`` (byte slice -> view(dtype) -> reshape, as ``reconstruct_tensors``
   does); every tensor's SHA-256 must match the parent's.
2. **time**: 8B-shaped bf16 layers (Qwen3-VL-8B's text shapes) bucketed at 512 MiB, flattened,
   handed off and copied into the child's preallocated weights; the seconds of ``--layers``
   layers are extrapolated by bytes to the whole model (goal <= 1 s per sync). The megatron
   export in front of it is timed by ``tools/bench_rollout.py`` (``weight_sync.measure_export``).

Exit status 0 when it ran (goals are reported, not asserted); 1 on an error or a checksum mismatch;
2 when ``--device cuda`` and there is no CUDA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megatron_prism.rollout.weight_sync import FlatBucket, bucketize, flatten, tensor_bytes

# Qwen3-VL-8B text model: hidden 4096, 36 layers, 32 q / 8 kv heads of 128, MLP 12288, vocab 151936
H, LAYERS, Q, KV, D, FFN, VOCAB = 4096, 36, 32, 8, 128, 12288, 151936
GOAL_S = 1.0


def layer_shapes(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.language_model.layers.{i}."
    return [(p + "self_attn.q_proj.weight", (Q * D, H)), (p + "self_attn.k_proj.weight", (KV * D, H)),
            (p + "self_attn.v_proj.weight", (KV * D, H)), (p + "self_attn.o_proj.weight", (H, Q * D)),
            (p + "mlp.gate_proj.weight", (FFN, H)), (p + "mlp.up_proj.weight", (FFN, H)),
            (p + "mlp.down_proj.weight", (H, FFN)), (p + "input_layernorm.weight", (H,)),
            (p + "post_attention_layernorm.weight", (H,)), (p + "self_attn.q_norm.weight", (D,)),
            (p + "self_attn.k_norm.weight", (D,))]


def model_bytes() -> int:
    per_layer = sum(torch.Size(s).numel() for _, s in layer_shapes(0)) * 2
    return per_layer * LAYERS + 2 * VOCAB * H * 2 + H * 2  # layers, embed + lm_head (untied), final norm


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def _child(inbox, outbox, device: str) -> None:
    """The engine side: rebuild each bucket, hash it (mode "hash") or load it (mode "load")."""
    weights: dict[str, torch.Tensor] = {}
    while True:
        msg = inbox.get()
        if msg is None:
            return
        mode, buffer, entries = msg
        tensors = FlatBucket(buffer, entries).unflatten()
        if mode == "hash":
            outbox.put([(n, _sha(t)) for n, t in tensors])
        else:
            for n, t in tensors:
                if n not in weights:
                    weights[n] = torch.empty_like(t)
                weights[n].copy_(t)
            if buffer.is_cuda:
                torch.cuda.synchronize(buffer.device)
            outbox.put(len(tensors))
        del tensors, buffer  # the sender's block may be reused only once this handle is closed


def run(device: str, layers: int, bucket_mb: int) -> dict:
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child, args=(inbox, outbox, device), daemon=True)
    child.start()
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        mixed = [("a.bf16", torch.randn(3, 5, generator=gen).to(torch.bfloat16)), ("b.fp32", torch.randn(7, generator=gen)),
                 ("c.bf16", torch.randn(11, 13, generator=gen).to(torch.bfloat16)), ("d.fp32", torch.randn(2, 2, 2, generator=gen))]
        mixed = [(n, t.to(device)) for n, t in mixed]
        flat = flatten(mixed, as_bytes=True)
        inbox.put(("hash", flat.buffer, flat.entries))
        got = dict(outbox.get(timeout=120))
        exact = got == {n: _sha(t) for n, t in mixed}

        if layers == 0:  # the hand-off check alone (what the CPU test runs)
            return {"device": "cpu" if device == "cpu" else torch.cuda.get_device_name(), "bit_exact": exact,
                    "layers": 0}
        named = [(n, torch.randn(s, dtype=torch.float32, device=device).to(torch.bfloat16))
                 for i in range(layers) for n, s in layer_shapes(i)]
        sent = sum(tensor_bytes(t) for _, t in named)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for bucket in bucketize(named, bucket_mb << 20):
            flat = flatten(bucket, as_bytes=True)
            if device.startswith("cuda"):
                torch.cuda.current_stream().synchronize()  # the packed bytes exist before the child reads them
            inbox.put(("load", flat.buffer, flat.entries))
            assert outbox.get(timeout=300) == len(bucket)
            del flat
        seconds = time.perf_counter() - start
        full = seconds * model_bytes() / sent
        return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                "bit_exact": exact, "layers": layers, "bytes": sent, "seconds": seconds,
                "gb_per_s": sent / seconds / 1e9, "full_model_bytes": model_bytes(),
                "full_sync_seconds_extrapolated": full, "goal_seconds": GOAL_S, "meets_goal": full <= GOAL_S}
    finally:
        inbox.put(None)
        child.join(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bucket-mb", type=int, default=512)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("weight_handoff: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    try:
        result = run(args.device, args.layers, args.bucket_mb)
    except Exception:  # noqa: BLE001 -- the section reports its failure and the next section runs
        traceback.print_exc()
        return 1
    (args.out / "weight_handoff.json").write_text(json.dumps(result, indent=2) + "\n")
    if not result["layers"]:
        line = f"weight_handoff: bit-exact {result['bit_exact']} on {result['device']} (no timing: --layers 0)"
    else:
        line = (f"weight_handoff: bit-exact {result['bit_exact']}; {result['layers']} 8B layers "
                f"{result['bytes'] / 2**30:.2f} GiB in {result['seconds']:.3f} s ({result['gb_per_s']:.1f} GB/s) -> "
                f"full sync {result['full_sync_seconds_extrapolated']:.2f} s (goal <= {GOAL_S} s) on {result['device']}")
    with open(args.out / "log.txt", "a") as log:
        log.write(line + "\n")
    print(line)
    return 0 if result["bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
