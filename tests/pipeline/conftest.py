"""A briefly SFT-trained tiny policy, built once per session, that the pipeline tests start from.

It matters: the random tiny model never produces the answer format, so every RLVR reward is 0,
every advantage is 0 and an RLVR step would not move the weights at all (a resume or TP comparison
of RLVR would then be vacuous). 60 SFT steps at a high constant learning rate are enough for some
sampled responses to earn the format reward.
"""

from __future__ import annotations

import pytest

from tests.pipeline.prism_proc import Warm, run_prism, stage_checkpoint


@pytest.fixture(scope="session")
def warm(tmp_path_factory) -> Warm:
    run_dir = tmp_path_factory.mktemp("warm_sft")
    run_prism(run_dir, "data.synth_sizes=sft=64,align=4,rl=16,eval=4", "stages.rlvr.enabled=false",
              "stages.eval.enabled=false", "stages.sft.steps=60", "stages.sft.global_batch_size=8",
              "stages.sft.save_every=60", "stages.sft.eval_every=0", "stages.sft.lr=5e-3",
              "optim.warmup_steps=0", "optim.schedule=constant")
    return Warm(run_dir / "data", stage_checkpoint(run_dir, "sft"))
