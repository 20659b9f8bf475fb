"""WARMUP and ALIGN on the tiny task, as real ``prism run`` processes.

One run, SFT (100 steps, so that most sampled responses have the format) -> WARMUP -> ALIGN, on a
task generated with 64 alignment records (the last 12 are held out by both stages):

* WARMUP must lift the discriminator's held-out accuracy (teacher demonstration above the policy's
  response, per part) from where the freshly upcycled, random-headed discriminator starts to
  clearly above chance;
* ALIGN must raise what the policy's side of the game maximises, judged on held-out prompts by
  the *same* discriminator ALIGN started from (WARMUP's): the weighted part scores with invalid
  responses counted below the lowest valid one (``discriminator_common.game_objective``).

And the 2-rank TP=2 and EP=2 runs of WARMUP + ALIGN finish (torchrun, gloo) with finite figures.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.pipeline.prism_proc import run_prism

# One fixed seed; a 12-step game on the tiny model is noisy. Measured at this commit (distributed
# optimizer, ALIGN without warm-up, batched discriminator), ALIGN's held-out objective under the
# starting discriminator rose at every seed tried: 1 -0.400 -> -0.148, 2 -0.322 -> -0.289,
# 3 -0.858 -> -0.751, 4 -0.541 -> -0.223, 1234 -0.730 -> -0.701 (+0.03 to +0.32, mean +0.15).
# The rise is what every seed showed, so that is the bar; its size is not (below +0.05 at 2 of 5).
# Seed 4's reasoning discriminator ends WARMUP at 0.78; seed 3 passes every assertion here.
GAME = ["run.seed=3", "data.synth_sizes=sft=96,align=64,rl=16,eval=4", "stages.sft.steps=100", "stages.sft.global_batch_size=8",
        "stages.sft.save_every=100", "stages.sft.eval_every=0", "stages.sft.lr=5e-3", "optim.warmup_steps=0",
        "optim.schedule=constant", "stages.rlvr.enabled=false", "stages.eval.enabled=false",
        "stages.warmup.enabled=true", "stages.warmup.steps=6", "stages.warmup.global_batch_size=8",
        "discriminator.warmup_lr=1e-3", "stages.align.enabled=true", "stages.align.steps=12",
        "stages.align.global_batch_size=4", "align.samples_per_prompt=8", "stages.align.lr=1e-3",
        "stages.align.eval_every=0", "stages.align.save_every=6", "parallel.micro_batch_size=8"]


def _result(run_dir, stage: str) -> dict:
    return json.loads((run_dir / stage / "result.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def game_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("game")
    run_prism(run_dir, *GAME, timeout=400)
    return run_dir


def test_warmup_lifts_heldout_discriminator_accuracy_above_chance(game_run):
    m = _result(game_run, "warmup")
    before, after = m["heldout_before"], m["heldout_after"]
    print("warmup held-out", {k: (round(before[k], 3), round(after[k], 3)) for k in before})
    for part in ("caption", "reasoning"):
        assert after[f"heldout/{part}/acc"] >= 0.8, after
        assert after[f"heldout/{part}/acc"] > before[f"heldout/{part}/acc"]
        assert after[f"heldout/{part}/gap"] > before[f"heldout/{part}/gap"] + 0.1


def test_short_game_raises_the_policys_standing_with_the_starting_discriminator(game_run):
    m = _result(game_run, "align")
    before, after, final = m["game_before"], m["game_after"], m["game_after_final_disc"]
    print("align held-out (starting disc) before -> after:",
          {k: (round(before[k], 3), round(after[k], 3)) for k in before}, "final disc:", final)
    assert after["game/objective"] > before["game/objective"]
    # The same judge scores the same teacher rows before and after: only the policy side moved.
    for part in ("caption", "reasoning"):
        assert after[f"game/{part}/teacher_mean"] == pytest.approx(before[f"game/{part}/teacher_mean"], abs=1e-5)
    steps = [json.loads(line) for line in (game_run / "metrics.jsonl").read_text().splitlines()]
    align = [r for r in steps if r["stage"] == "align" and "disc/grad_norm" in r]
    assert len(align) == 12 and all(math.isfinite(r["disc/grad_norm"]) and r["disc/grad_norm"] > 0 for r in align)


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.ep=2"])
def test_warmup_and_align_on_two_ranks(warm, tmp_path, layout):
    """TP=2 (the MoE discriminator with sequence parallelism) and EP=2 (DP=2 for the policy, the
    discriminator's experts split over the two ranks) in the same processes as the policy."""
    run_dir = tmp_path / "two_ranks"
    root = warm.data_root
    run_prism(run_dir, *warm.overrides(), "stages.sft.enabled=false", "stages.rlvr.enabled=false",
              "stages.eval.enabled=false", "stages.warmup.enabled=true", "stages.align.enabled=true",
              f"stages.warmup.data_path={root / 'sft'}", f"stages.align.data_path={root / 'sft'}",
              "stages.warmup.steps=2", "stages.warmup.global_batch_size=4", "stages.align.steps=2",
              "stages.align.global_batch_size=2", "align.samples_per_prompt=2", "stages.align.eval_every=0",
              "rollout.max_new_tokens=32", layout, "parallel.micro_batch_size=2", nproc=2, timeout=400)
    m = _result(run_dir, "align")
    assert m["final"] and math.isfinite(m["final"]["disc/grad_norm"]) and math.isfinite(m["final"]["grad_norm"])
    assert _result(run_dir, "warmup")["heldout_after"]
