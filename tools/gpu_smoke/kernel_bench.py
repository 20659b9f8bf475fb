#!/usr/bin/env python
"""GPU smoke section "kernel_bench": the kernel benchmark's quick figures, within about two minutes.

    python tools/gpu_smoke/kernel_bench.py OUT_DIR

Writes OUT_DIR/kernel_bench.json and appends a summary to OUT_DIR/log.txt (the layout every
tools/gpu_smoke section follows). What it measures, with kernels/bench.py's functions:

* the device's copy bandwidth and bf16 matmul rate (8192^3);
* the fused policy loss at 64M tokens (bf16), Triton vs eager: us, speed-up, GB/s with the true
  bytes, % of the copy bandwidth (goal >= 85 %, >= 4x eager);
* linear -> log-prob at T=8192, H=4096, V=151936 (bf16): fused forward, general and single-pass
  forward + backward, eager materialised forward + backward: us, % of the matmul rate with useful
  FLOPs (goals >= 80 % forward, >= 70 % forward + backward), and torch.cuda.max_memory_allocated
  of each against the fake-tensor count (goal <= 1/10 of fp32 logits);
* the weight-gradient accumulation path this torch build took.

torch.compile rows are left to the full tool (python tools/bench_kernels.py), whose compile times
would not fit this section's budget. Exit status 0 when it ran (the goals are reported, not
asserted: a benchmark is not a test); 1 on an error, 2 without CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    started = time.time()
    result: dict = {"section": "kernel_bench", "ok": False}
    try:
        if not torch.cuda.is_available():
            result["error"] = "no CUDA device"
            return 2
        from kernels import bench

        result["device"] = torch.cuda.get_device_name()
        copy_gbs, tflops = bench.measure_peaks()
        result["peaks"] = {"copy_gbs": copy_gbs, "bf16_matmul_tflops": tflops}
        loss = bench.bench_policy_loss(bench.BANDWIDTH_FROM_TOKENS, torch.bfloat16, with_compile=False)
        shape = bench.BENCH_SHAPE
        head = bench.bench_linear_logprob(shape["tokens"], shape["hidden"], shape["vocab"], torch.bfloat16,
                                          with_reference=True, with_compile=False)
        rows, logits_mib = bench.memory_report()
        result["memory_fake"] = {"fp32_logits_mib": logits_mib, "rows": [dataclasses.asdict(r) for r in rows]}
        result["timings"] = [dict(dataclasses.asdict(r), rate=r.rate) for r in loss + head]
        result["wgrad_path"] = bench.flp.LAST_WGRAD_PATH
        by = {(r.kernel, r.path): r for r in loss + head}
        fused_loss, eager_loss = by[("fused policy loss", "triton fwd+bwd")], by[("fused policy loss", "eager fwd+bwd")]
        lp_fwd = by[("linear->logprob", "fused fwd")]
        lp_single = by[("linear->logprob", "fused single-pass fwd+bwd")]
        lp_general = by[("linear->logprob", "fused general fwd+bwd")]
        result["summary"] = {
            "loss_pct_copy_bw": 100 * fused_loss.rate / copy_gbs, "loss_speedup_vs_eager": eager_loss.us / fused_loss.us,
            "logprob_fwd_pct_matmul": 100 * lp_fwd.rate / tflops,
            "logprob_single_pass_pct_matmul": 100 * lp_single.rate / tflops,
            "logprob_general_pct_matmul": 100 * lp_general.rate / tflops,
            "logprob_peak_mib_cuda": max(r.extra.get("peak_mib", 0.0) for r in (lp_fwd, lp_single, lp_general)),
            "fp32_logits_mib": logits_mib,
        }
        result["ok"] = True
        return 0
    except Exception:  # noqa: BLE001 - a section reports its failure and lets the next one run
        result["error"] = traceback.format_exc()
        return 1
    finally:
        result["seconds"] = time.time() - started
        (out / "kernel_bench.json").write_text(json.dumps(result, indent=2, default=str))
        with log.open("a") as f:
            summary = result.get("summary") or result.get("error", "")
            f.write(f"[kernel_bench] ok={result['ok']} {result['seconds']:.0f}s {json.dumps(summary, default=str)}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
