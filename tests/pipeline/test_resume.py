"""Exact resume after a real crash: ``prism run`` is SIGKILLed at chosen points (SFT between steps,
an RLVR rollout, the middle of an RLVR optimizer step, a checkpoint write), the same command is run
again until it finishes, and the final weights must equal those of an uninterrupted run bit for bit.

The kill points are hit deterministically through the test seam ``megatron_prism.training.faults``
(``prism_proc.kill_at``; nothing is mocked, the rerun has no pause variables).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.pipeline.prism_proc import (ROOT, kill_at, prism_argv, prism_env, run_prism, shard_tensors,
                                      stage_checkpoint)

# 3 SFT steps and 2 RLVR steps, a checkpoint after every step, held-out eval before/after each
# stage (so eval_before is restored from the checkpoint on resume), no EVAL stage.
SHORT = ["stages.sft.steps=3", "stages.sft.global_batch_size=4", "stages.sft.save_every=1",
         "stages.sft.eval_every=100", "stages.rlvr.steps=2", "stages.rlvr.global_batch_size=2", "rollout.n=4",
         "rollout.max_new_tokens=32", "stages.rlvr.save_every=1", "stages.rlvr.eval_every=100",
         "stages.eval.enabled=false", "optim.warmup_steps=0"]

# name@k (k-th hit in the killed process), and the checkpoint the rerun must resume from.
KILL_POINTS = {
    "sft.step@2": ("sft", "step_00000001"),          # SFT step 2 updated the weights, not yet saved
    "rlvr.rollout@2": ("rlvr", "step_00000001"),     # during RLVR step 2's generation round
    "rlvr.update@2": ("rlvr", "step_00000001"),      # RLVR step 2: gradients reduced, optimizer not stepped
    "checkpoint.write@5": ("rlvr", "step_00000001"),  # RLVR step 2's checkpoint: shard + rank file written
}


def _overrides(warm) -> list[str]:
    return [*warm.overrides(), *SHORT]


@pytest.fixture(scope="module")
def reference(warm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    run_prism(run_dir, *_overrides(warm))
    return run_dir


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_resume_after_sigkill_is_bit_exact(point, warm, reference, tmp_path):
    run_dir = tmp_path / "run"
    overrides = _overrides(warm)
    kill_at(point, run_dir, overrides)

    stage, resume_from = KILL_POINTS[point]
    ckpts = run_dir / stage / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == resume_from
    assert not (run_dir / stage / "result.json").exists()
    if point.startswith("checkpoint.write"):
        tmp = ckpts / ".tmp-step_00000002"  # a half-written checkpoint that must never be loaded
        assert {p.name for p in tmp.iterdir()} >= {"mp_rank_00_000.safetensors", "rank_00000.pt"}
        assert not (tmp / "COMPLETE.json").exists() and not (ckpts / "step_00000002").exists()

    for _ in range(3):  # "run the same command again until it finishes" (here: once)
        proc = subprocess.run(prism_argv(run_dir, *overrides), cwd=ROOT, env=prism_env(), capture_output=True,
                              text=True, timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"stage {stage}: starting" in proc.stdout
    assert not list(run_dir.glob("*/checkpoints/.tmp-*"))

    for name in ("sft", "rlvr"):
        ref_ckpt, got_ckpt = stage_checkpoint(reference, name), stage_checkpoint(run_dir, name)
        assert got_ckpt.name == ref_ckpt.name
        ref, got = shard_tensors(ref_ckpt), shard_tensors(got_ckpt)
        assert ref.keys() == got.keys()
        differ = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert not differ, f"{name}: {len(differ)} of {len(ref)} tensors differ after resume, e.g. {differ[:3]}"
        ref_state = json.loads((ref_ckpt / "trainer_state.json").read_text())
        assert json.loads((got_ckpt / "trainer_state.json").read_text()) == ref_state

    # The weights really moved in RLVR (a zero-advantage step would make the comparison vacuous).
    rlvr = shard_tensors(stage_checkpoint(reference, "rlvr"))
    sft = shard_tensors(stage_checkpoint(reference, "sft"))
    assert any(not torch.equal(rlvr[k], sft[k]) for k in rlvr)
