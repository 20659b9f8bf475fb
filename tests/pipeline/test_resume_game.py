"""Exact resume of the game: ``prism run`` SIGKILLed inside ALIGN (after a policy mini-batch's
backward, before its optimizer step; the discriminator has already taken this step's update) and
run again ends with the same policy and the same discriminator, bit for bit, as an uninterrupted
run. Starts from the briefly SFT-trained ``warm`` policy; WARMUP and ALIGN only, 2 steps each."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.pipeline.prism_proc import (ROOT, kill_at, prism_argv, prism_env, report_figures, run_prism,
                                      shard_tensors)

GAME2 = ["stages.sft.enabled=false", "stages.rlvr.enabled=false", "stages.eval.enabled=false",
         "stages.warmup.enabled=true", "stages.warmup.steps=2", "stages.warmup.global_batch_size=2",
         "stages.warmup.save_every=1", "stages.align.enabled=true", "stages.align.steps=3",
         "stages.align.global_batch_size=1", "align.samples_per_prompt=4", "stages.align.save_every=1",
         "stages.align.eval_every=0", "rollout.max_new_tokens=32",
         "stages.warmup.rollout.max_new_tokens=64", "stages.align.rollout.max_new_tokens=64",
         "optim.warmup_steps=0",
         "parallel.micro_batch_size=2"]  # whole micro-batches: WARMUP's 2 pairs, ALIGN's 1 x 4 samples


def _latest(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def _disc_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return shard_tensors(_latest(run_dir / "align" / "disc_checkpoints") / "model")


@pytest.fixture(scope="module")
def game_reference(warm, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("game_reference")
    run_prism(run_dir, *warm.overrides(), *GAME2)
    return run_dir


def test_align_resume_after_sigkill_and_a_garbled_discriminator_is_bit_exact(warm, game_reference, tmp_path):
    """Killed in ALIGN's third step; then the newest discriminator checkpoint (step 2) is garbled in
    place: the rerun passes over step 2 of both players (a step needs both halves) and resumes from
    step 1, ending bit-exact."""
    run_dir = tmp_path / "run"
    overrides = [*warm.overrides(), *GAME2]
    kill_at("align.update@3", run_dir, overrides)
    assert (run_dir / "warmup" / "result.json").is_file() and not (run_dir / "align" / "result.json").exists()
    assert (run_dir / "align" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    shard = next((run_dir / "align" / "disc_checkpoints" / "step_00000002" / "model").glob("mp_rank_*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(range(64))
    shard.write_bytes(bytes(data))

    proc = subprocess.run(prism_argv(run_dir, *overrides), cwd=ROOT, env=prism_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage warmup: already finished" in proc.stdout and "stage align: starting" in proc.stdout
    passed = [ln for ln in proc.stdout.splitlines() if "checkpoint step_00000002 does not verify, passed over" in ln]
    assert len(passed) == 1 and "disc_checkpoints/step_00000002/model" in passed[0], proc.stdout[-3000:]
    assert "resumed from" in proc.stdout and "step_00000001 (step 1)" in proc.stdout

    ref_policy, got_policy = (shard_tensors(_latest(d / "align" / "checkpoints")) for d in (game_reference, run_dir))
    assert ref_policy.keys() == got_policy.keys()
    assert [k for k in ref_policy if not torch.equal(ref_policy[k], got_policy[k])] == []
    ref_disc, got_disc = _disc_tensors(game_reference), _disc_tensors(run_dir)
    assert ref_disc.keys() == got_disc.keys() and ref_disc
    assert [k for k in ref_disc if not torch.equal(ref_disc[k], got_disc[k])] == []
    # The game moved both players (a comparison of unchanged weights would prove nothing).
    start = shard_tensors(warm.checkpoint)
    assert any(not torch.equal(ref_policy[k], start[k]) for k in ref_policy if k in start)


def test_align_restarted_from_scratch_reproduces(warm, game_reference, tmp_path):
    """Killed in ALIGN's first step, before its first checkpoint: the rerun starts ALIGN afresh in
    a process where WARMUP did not run, and still reproduces every figure of the report (each stage
    seeds every RNG from (run seed, stage), whatever ran before it in the process)."""
    run_dir = tmp_path / "run"
    overrides = [*warm.overrides(), *GAME2]
    kill_at("align.update@1", run_dir, overrides)
    assert not list((run_dir / "align").glob("checkpoints/step_*"))
    proc = subprocess.run(prism_argv(run_dir, *overrides), cwd=ROOT, env=prism_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage warmup: already finished" in proc.stdout
    assert report_figures(run_dir) == report_figures(game_reference)
    ref_policy, got_policy = (shard_tensors(_latest(d / "align" / "checkpoints")) for d in (game_reference, run_dir))
    assert [k for k in ref_policy if not torch.equal(ref_policy[k], got_policy[k])] == []
