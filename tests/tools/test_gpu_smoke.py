"""tools/gpu_smoke.sh on a CPU: its argument handling, its dry run (which resolves the stage
overrides through ``prism run --print-config`` for real) and its refusal without a GPU. The GPU
run itself is owed to a GPU machine (docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_smoke.sh"
PLANNED = ["gpu_environment", "megatron_core", "stage_config", "gpu_kernel_tests", "te_parity", "device_audit",
           "kernel_bench", "weight_handoff", "stages_uninterrupted", "stages_resumed_after_every_step", "resume_bit_exact"]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PRISM_SMOKE_ALLOW_CPU"}
    environ.update({"PRISM_PYTHON": sys.executable, **env})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=environ)


def test_gpu_smoke_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args", [(), ("--bogus", "x"), ("a", "b")], ids=["no-dir", "unknown-option", "two-dirs"])
def test_gpu_smoke_bad_usage_is_one_usage_line_and_exit_2(args):
    proc = _run(*args)
    assert proc.returncode == 2
    assert "usage: bash tools/gpu_smoke.sh" in proc.stderr


def test_gpu_smoke_dry_run_plans_every_check_and_resolves_the_stage_config(tmp_path):
    proc = _run("--dry-run", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["dry_run"] is True and result["passed"] is True
    assert [c["name"] for c in result["checks"]] == PLANNED
    status = {c["name"]: c["status"] for c in result["checks"]}
    assert status.pop("stage_config") == "pass" and set(status.values()) == {"planned"}
    resolved = (tmp_path / "out" / "stage_config.yaml").read_text()
    assert "dtype: bfloat16" in resolved
    assert (tmp_path / "out" / "gpu_smoke.log").read_text().count("=== [") == len(PLANNED) - 1


def test_gpu_smoke_without_a_gpu_fails_at_once_and_says_why(tmp_path):
    proc = _run(str(tmp_path / "out"))
    assert proc.returncode == 1
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["passed"] is False and result["checks"][0] == {**result["checks"][0], "name": "gpu_environment",
                                                                  "status": "fail"}
    assert "no CUDA device" in (tmp_path / "out" / "gpu_smoke.log").read_text()
    assert result["seconds"] < 60
