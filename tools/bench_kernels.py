#!/usr/bin/env python
"""Benchmark the kernels against torch eager and torch.compile of their references.

    python tools/bench_kernels.py              # memory at the benchmark shape; on a GPU the full sweep
    python tools/bench_kernels.py --quick      # one size per kernel (about a minute on an H100/H200)
    python tools/bench_kernels.py --json OUT   # also write every figure to OUT

Everywhere: the peak memory of forward + backward of the linear -> log-prob head at T=8192,
H=4096, V=151936 (bf16), fused against materialised, counted from the allocations of the real code
on fake tensors (no compute, so it runs on a CPU). With CUDA: microseconds by
triton.testing.do_bench, speed-up over eager and over torch.compile of each reference at several
sizes, bandwidth (fused loss, 64M+ tokens) and % of the measured bf16 matmul rate (linear ->
log-prob). Without CUDA it says so and runs a small correctness pass under Triton's interpreter
instead (exit 1 if a kernel disagrees with the float64 definitions). See kernels/bench.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    parser.add_argument("--quick", action="store_true", help="one size per kernel")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hidden", type=int, default=bench.BENCH_SHAPE["hidden"])
    parser.add_argument("--vocab", type=int, default=bench.BENCH_SHAPE["vocab"])
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    record: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__}

    shape = dict(bench.BENCH_SHAPE, hidden=args.hidden, vocab=args.vocab)
    mem_rows, logits_mib = bench.memory_report(shape["tokens"], shape["hidden"], shape["vocab"], dtype)
    print(bench.memory_table(mem_rows, logits_mib, shape))
    record["memory"] = {"shape": shape, "fp32_logits_mib": logits_mib, "rows": [dataclasses.asdict(r) for r in mem_rows]}

    if not torch.cuda.is_available():
        print("\nbench_kernels: timings need a CUDA device; none here. Running the correctness pass "
              "under TRITON_INTERPRET=1 instead.")
        failed = 0
        record["correctness"] = []
        for name, err, tol in bench.correctness_pass():
            ok = err <= tol
            failed += not ok
            record["correctness"].append({"check": name, "max_abs_err": err, "tol": tol, "ok": ok})
            print(f"  {'ok ' if ok else 'BAD'} {name:<40} max |err| {err:.2e} (tol {tol:.1e})")
        _write(args.json, record)
        return 1 if failed else 0

    print(f"\ndevice: {record['device']}  torch {torch.__version__}  dtype {args.dtype}")
    copy_gbs, matmul_tflops = bench.measure_peaks()
    record["peaks"] = {"copy_gbs": copy_gbs, "bf16_matmul_tflops": matmul_tflops}
    print(f"measured peaks: copy {copy_gbs:.0f} GB/s, bf16 matmul (8192^3) {matmul_tflops:.0f} TFLOP/s\n")
    timings = []
    loss_sizes = (65536, bench.BANDWIDTH_FROM_TOKENS) if args.quick else bench.LOSS_TOKENS
    loss_rows = [r for n in loss_sizes for r in bench.bench_policy_loss(n, dtype)]
    print(bench.timing_table(loss_rows, copy_gbs, f"copy bandwidth {copy_gbs:.0f} GB/s"))
    timings += loss_rows
    lp_rows = []
    for tokens in ((8192,) if args.quick else bench.LOGPROB_TOKENS):
        lp_rows += bench.bench_linear_logprob(tokens, shape["hidden"], shape["vocab"], dtype,
                                              with_reference=tokens <= 8192)
    print()
    print(bench.timing_table(lp_rows, matmul_tflops, f"bf16 matmul rate {matmul_tflops:.0f} TFLOP/s"))
    print(f"  weight-gradient accumulation path: {bench.flp.LAST_WGRAD_PATH}")
    timings += lp_rows
    record["timings"] = [dict(dataclasses.asdict(r), rate=r.rate) for r in timings]
    record["wgrad_path"] = bench.flp.LAST_WGRAD_PATH
    _write(args.json, record)
    return 0


def _write(path: Path | None, record: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
