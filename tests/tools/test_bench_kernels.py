"""tools/bench_kernels.py: everywhere it counts the head's peak memory at the benchmark shape on fake
tensors (fused within 1/10 of the fp32 logits, materialised above them); on a CPU it says it needs
CUDA and runs the correctness pass (exit 0); on a GPU (marked) it runs the quick sweep."""

from __future__ import annotations

import json
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


def _check_memory(record: dict) -> None:
    mem = record["memory"]
    assert mem["shape"] == {"tokens": 8192, "hidden": 4096, "vocab": 151936}
    rows = {r["path"]: r["peak_mib"] for r in mem["rows"]}
    fused = [v for k, v in rows.items() if k.startswith("fused") and "fwd+bwd" in k]
    materialised = [v for k, v in rows.items() if not k.startswith("fused")]
    assert len(fused) == 2 and all(0 < v <= mem["fp32_logits_mib"] / 10 for v in fused), rows
    assert materialised and all(v > mem["fp32_logits_mib"] for v in materialised), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback only runs without CUDA")
def test_cpu_counts_memory_and_runs_the_correctness_pass(tmp_path):
    proc = _run("--json", str(tmp_path / "out.json"), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "need a CUDA device" in proc.stdout and "peak memory of forward + backward" in proc.stdout
    lines = [l for l in proc.stdout.splitlines() if l.strip().startswith(("ok", "BAD"))]
    assert len(lines) == 6 and all(l.strip().startswith("ok") for l in lines), proc.stdout
    record = json.loads((tmp_path / "out.json").read_text())
    _check_memory(record)
    assert len(record["correctness"]) == 6 and all(c["ok"] for c in record["correctness"])


@pytest.mark.gpu
def test_gpu_quick_sweep_reports_percent_of_measured_peak(tmp_path):
    proc = _run("--quick", "--json", str(tmp_path / "out.json"), timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "measured peaks" in proc.stdout and "% peak" in proc.stdout
    assert "fused single-pass fwd+bwd" in proc.stdout
    record = json.loads((tmp_path / "out.json").read_text())
    _check_memory(record)
    lp = [t for t in record["timings"] if t["kernel"] == "linear->logprob" and t["path"].startswith("fused")]
    assert lp and all(t["extra"]["peak_mib"] <= record["memory"]["fp32_logits_mib"] / 10 for t in lp)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the section's no-CUDA report")
def test_gpu_smoke_section_reports_without_cuda(tmp_path):
    """tools/gpu_smoke/kernel_bench.py follows the section layout: OUT/kernel_bench.json, a line
    appended to OUT/log.txt; without CUDA it says so (exit 2) instead of crashing."""
    section = TOOL.parent / "gpu_smoke" / "kernel_bench.py"
    (tmp_path / "log.txt").write_text("[earlier] section\n")
    proc = subprocess.run([sys.executable, str(section), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert record["section"] == "kernel_bench" and record["ok"] is False and "no CUDA" in record["error"]
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines[0] == "[earlier] section" and lines[1].startswith("[kernel_bench] ok=False")


@pytest.mark.gpu
def test_gpu_smoke_section_runs(tmp_path):
    section = TOOL.parent / "gpu_smoke" / "kernel_bench.py"
    proc = subprocess.run([sys.executable, str(section), str(tmp_path)], capture_output=True, text=True, timeout=600)
    record = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert proc.returncode == 0 and record["ok"], record.get("error")
    assert record["summary"]["logprob_peak_mib_cuda"] <= record["summary"]["fp32_logits_mib"] / 10
