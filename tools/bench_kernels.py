#!/usr/bin/env python
"""Benchmark the fused Triton kernels against torch eager and torch.compile of their references.

    python tools/bench_kernels.py            # full sweep on a CUDA device (minutes)
    python tools/bench_kernels.py --quick    # one shape per kernel

Prints achieved GB/s (loss kernel) and TFLOP/s (linear -> log-prob) as a percentage of this
device's measured copy bandwidth and bf16 matmul rate, speed-up over eager, and peak memory. On a
machine without CUDA it says so and runs a small correctness pass under Triton's interpreter
instead (exit 1 if a kernel disagrees with its float64 reference). See kernels/bench.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape per kernel")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: timings need a CUDA device; none here. Running the correctness pass "
              "under TRITON_INTERPRET=1 instead.")
        failed = 0
        for name, err, tol in bench.correctness_pass():
            ok = err <= tol
            failed += not ok
            print(f"  {'ok ' if ok else 'BAD'} {name:<40} max |err| {err:.2e} (tol {tol:.1e})")
        return 1 if failed else 0

    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")
    copy_gbs, matmul_tflops = bench.measure_peaks()
    print(f"measured peaks: copy {copy_gbs:.0f} GB/s, bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    for tokens in ([65536] if args.quick else [8192, 32768, 65536]):
        rows = bench.bench_policy_loss(tokens, dtype, copy_gbs)
        print(bench.report(f"\nfused policy loss, {tokens} tokens", rows, copy_gbs))
    for tokens in ([8192] if args.quick else [8192, 16384, 65536]):
        with_ref = tokens <= 16384  # materialised logits beyond this do not fit next to the model
        rows = bench.bench_linear_logprob(tokens, args.hidden, args.vocab, dtype, with_ref)
        logits_mib = tokens * args.vocab * 4 / 2**20
        print(bench.report(f"\nfused linear->logprob, T={tokens} H={args.hidden} V={args.vocab}", rows,
                           matmul_tflops, logits_mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
