"""The figures rank 0 logs at PP=2 and DP=2 equal those of one process on the same global batch.

Before issue 12 rank 0 logged NaN as the loss at PP>1 (its loss functions never run) and 1/DP of
the loss at DP>1 (its own share). Three torchrun launches of ``step_metrics_worker.py`` (gloo,
float32, one thread): 1 process, 2 processes at PP=2, 2 processes at DP=2, each one RLVR update
(4 micro-batches of 8 samples in all) and one SFT step; every rank of every layout must report the
one-process loss, token count and grad norm (megatron's, from its optimizer) to 1e-5 relative.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "step_metrics_worker.py"
REPO = Path(__file__).resolve().parents[2]


def _launch(nproc: int, hf: Path, out: Path, *flags: str) -> list[dict]:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           "--hf", str(hf), "--out", str(out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({nproc} procs {flags}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory):
    return _launch(1, tiny_dirs["a"], tmp_path_factory.mktemp("metrics") / "one")[0]


@pytest.mark.parametrize("flags", [("--pp", "2"), ()], ids=["pp2", "dp2"])
def test_every_rank_logs_the_full_step_figures(flags, reference, tiny_dirs, tmp_path):
    ranks = _launch(2, tiny_dirs["a"], tmp_path / "two", *flags)
    expect_dp, expect_pp = (1, 2) if flags else (2, 1)
    assert all(math.isfinite(reference[k]) for k in ("rl_loss", "sft_loss", "rl_grad_norm", "sft_grad_norm"))
    assert reference["sft_loss"] > 0 and reference["rl_grad_norm"] > 0
    for rank, got in enumerate(ranks):
        assert (got["dp"], got["pp"]) == (expect_dp, expect_pp)
        for key in ("rl_loss", "rl_tokens", "rl_grad_norm", "sft_loss", "sft_grad_norm"):
            assert math.isfinite(got[key]), f"rank {rank} logs {key} = {got[key]}"
            assert got[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), (rank, key, got[key], reference[key])
