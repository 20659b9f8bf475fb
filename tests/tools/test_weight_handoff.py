"""tools/gpu_smoke/weight_handoff.py: the hand-off of a flattened mixed-dtype bucket to a child
process and its rebuild there (SGLang's FlattenedTensorBucket layout) is bit-exact. On CPU the
queue shares the buffer through shared memory; on a GPU the same code sends a CUDA-IPC handle
(and times 8B-shaped layers), which is a GPU check owed where no GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTION = REPO / "tools" / "gpu_smoke" / "weight_handoff.py"


def test_handoff_is_bit_exact_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(SECTION), str(tmp_path), "--device", "cpu", "--layers", "0"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "weight_handoff.json").read_text())
    assert result["bit_exact"] is True and result["device"] == "cpu"
    assert "weight_handoff: bit-exact True" in (tmp_path / "log.txt").read_text()


def test_without_cuda_it_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # a GPU machine measures instead (tools/gpu_smoke)
    proc = subprocess.run([sys.executable, str(SECTION), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and "no CUDA" in proc.stderr
