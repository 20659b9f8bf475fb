"""tools/bench_rollout.py: its guards and one real (tiny) timed round with the line it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_rollout.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_refuses_bad_threads_and_process_clock_on_gpu():
    out = _run("--threads", "0")
    assert out.returncode == 2 and "--threads must be at least 1" in out.stderr
    out = _run("--clock", "process", "--device", "cuda")
    assert out.returncode == 2 and "--clock process measures CPU time" in out.stderr


def test_one_round_prints_engine_and_hf_rates():
    out = _run("--threads", "1", "--clock", "process", "--batch-sizes", "2", "--new-tokens", "3", "--repeats", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 threads" in out.stdout and "process clock" in out.stdout
    m = re.search(r"batch 2: engine (\d+) tok/s, hf (\d+) tok/s, ([\d.]+)x", out.stdout)
    assert m, out.stdout
    engine, hf, ratio = int(m[1]), int(m[2]), float(m[3])
    assert engine > 0 and hf > 0 and ratio > 0
