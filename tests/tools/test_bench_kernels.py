"""tools/bench_kernels.py: on a CPU it says it needs CUDA and runs the correctness pass (exit 0);
on a GPU (marked) it runs the quick sweep and prints the measured peaks and percentages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_kernels.py"


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback only runs without CUDA")
def test_cpu_runs_the_correctness_pass():
    proc = _run(timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "need a CUDA device" in proc.stdout
    lines = [l for l in proc.stdout.splitlines() if l.strip().startswith(("ok", "BAD"))]
    assert len(lines) == 6 and all(l.strip().startswith("ok") for l in lines), proc.stdout


@pytest.mark.gpu
def test_gpu_quick_sweep_reports_percent_of_measured_peak():
    proc = _run("--quick", timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "measured peaks" in proc.stdout and "% peak" in proc.stdout
    assert "triton fwd+bwd" in proc.stdout
