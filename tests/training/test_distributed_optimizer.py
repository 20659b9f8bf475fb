"""megatron's distributed optimizer (the GPU default) on CPU at DP=2, and its exact resume: the
parameter state (fp32 main params, exp_avg, exp_avg_sq shards) that its state_dict leaves out is
saved and restored by megatron_prism.training.optimizer_state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_optimizer_worker.py")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_prism.models.qwen3vl.tiny import save_random_qwen3vl

    return save_random_qwen3vl(tmp_path_factory.mktemp("dopt") / "a", "a", seed=3)


def _run(hf_dir: Path, out: Path, *flags: str) -> list[dict]:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           "--hf", str(hf_dir), "--out", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]


def test_resume_with_parameter_state_is_bit_exact_and_without_it_is_not(hf_dir, tmp_path):
    exact = _run(hf_dir, tmp_path / "exact")
    for r in exact:
        assert r["optimizers"] == ["DistributedOptimizer"]  # the real one, not the CPU fallback
        assert r["max_abs_diff"] == 0.0
        assert r["loss_resumed"] == r["loss_uninterrupted"]
    held = [torch.load(tmp_path / "exact" / f"param_state_rank{r}.pt", weights_only=True) for r in range(2)]
    assert held[0][0] is not None and held[1] == [None]  # gathered on data-parallel rank 0 only
    broken = _run(hf_dir, tmp_path / "state_dict_only", "--skip-parameter-state")
    # the state dict alone leaves main params / moments as megatron's torch.empty placeholders
    assert all(r["max_abs_diff"] > 0 or r["max_abs_diff"] != r["max_abs_diff"] for r in broken)


def test_missing_or_foreign_parameter_state_is_a_clear_error():
    from megatron_prism.training import optimizer_state

    class Part:  # the two methods and the gloo group megatron's DistributedOptimizer exposes
        class data_parallel_group_gloo:  # noqa: N801
            @staticmethod
            def rank() -> int:
                return 0

        optimizer = None

        def get_parameter_state_dp_zero(self):
            return {"x": torch.zeros(2)}

        def load_parameter_state_from_dp_zero(self, state):
            raise AssertionError("must not be reached")

    class Chained:
        chained_optimizers = [Part()]

    with pytest.raises(ValueError, match=r"rank_00000.pt: holds no distributed-optimizer state.*use_distributed_optimizer"):
        optimizer_state.scatter_parameter_state(Chained(), None, origin="rank_00000.pt")
    with pytest.raises(ValueError, match="holds 2 optimizer parts, this model's optimizer has 1"):
        optimizer_state.scatter_parameter_state(Chained(), [{"x": 1}, {"y": 2}], origin="f.pt")
    with pytest.raises(ValueError, match="saved parameter state is empty"):
        optimizer_state.scatter_parameter_state(Chained(), [None], origin="f.pt")
    assert optimizer_state.gather_parameter_state(Chained())[0]["x"].shape == (2,)
