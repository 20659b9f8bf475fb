"""Issue 14's bad input: a stage budget the task's demonstrations do not fit is one line before any
model is built, from the generator (fresh synthetic data) or from the run's check of an existing
split (data.root), naming the records and by how much."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_prism.data.budget import ResponseBudgetError
from megatron_prism.data.synth import SynthSizes, generate_dataset

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"
SIZES = "data.synth_sizes=sft=40,align=40,rl=8,eval=8"


def prism_run(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_prism.cli", "run", str(TINY), f"run.output_dir={out}",
                           *overrides], capture_output=True, text=True, env=env, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("prism")]  # not library warnings
    assert len(lines) == 1 and lines[0].startswith("prism: error: "), proc.stderr
    return lines[0]


def test_the_generator_refuses_a_budget_its_demonstrations_do_not_fit(tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = error_line(prism_run(out, SIZES + ",max_response_tokens=30"))
    assert "demonstrations do not fit data.synth_sizes max_response_tokens=30 (end token included)" in line
    assert "/align/data.jsonl:synth-align-" in line and "tokens," in line and "over)" in line
    assert not (out / "tiny_model").exists() and not (out / "data" / "manifest.json").exists()


def test_a_run_refuses_a_warmup_budget_the_existing_split_does_not_fit(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_dataset(data, 5, SynthSizes(sft=40, align=40, rl=8, eval=8))
    out = tmp_path / "run"
    line = error_line(prism_run(out, f"data.root={data}", "stages.warmup.rollout.max_new_tokens=30"))
    assert f"stage warmup ({data / 'align'})" in line
    assert "demonstrations do not fit stages.warmup.rollout.max_new_tokens=30 (end token included)" in line
    assert f"{data / 'align' / 'data.jsonl'}:" in line and "raise stages.warmup.rollout.max_new_tokens to at least" in line
    assert not (out / "tiny_model").exists() and not (out / "warmup").exists()
    # the same budget passes where no stage reads the demonstrations under it: the control arm
    from megatron_prism.config import load_config
    from megatron_prism.pipeline import check_demonstration_budgets

    control = load_config(TINY, [f"data.root={data}", "stages.warmup.enabled=false", "align.policy_reward=verifiable",
                                 "stages.align.rollout.max_new_tokens=30"])
    check_demonstration_budgets(control, data)
    game = load_config(TINY, [f"data.root={data}", "stages.align.rollout.max_new_tokens=30"])
    with pytest.raises(ResponseBudgetError, match="stages.align.rollout.max_new_tokens=30"):
        check_demonstration_budgets(game, data)
