"""tools/bench_rlvr.py's guards (the benchmark itself needs TRL, which is not a dependency, and
minutes of CPU: its figures live in docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_rlvr.py"


def _run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, env=env)


def test_says_trl_is_missing(tmp_path):
    """With TRL not importable (a stand-in module that raises ImportError shadows any installed
    one) the tool says how to get it and exits 2 instead of failing deep in a stack."""
    (tmp_path / "trl.py").write_text("raise ImportError('no trl here')\n")
    proc = _run(env_extra={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install trl" in proc.stdout


def test_needs_a_timed_step_after_the_warm_up():
    proc = _run("--steps", "1")
    assert proc.returncode == 2 and "--steps must be at least 2" in proc.stderr
