"""The EVAL stage: held-out accuracy of the pipeline's final weights (no training)."""

from __future__ import annotations

import time

from megatron_prism.stages.common import evaluation_at_start, input_processor, run_evaluation
from megatron_prism.training.loop import StageContext, StageResult
from megatron_prism.training.runtime import PolicyRuntime


def run_eval_stage(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    started = time.time()
    if ctx.source_heldout and not ctx.stage.data_path:
        # the stage before ended on these weights and evaluated them on this split, as here
        after = evaluation_at_start(ctx, None, None, label="final")
    else:
        runtime = PolicyRuntime.build(ctx.source, cfg.model, cfg.parallel, None, total_steps=1, seed=cfg.run.seed,
                                      trainable=False)
        after = run_evaluation(ctx, runtime, input_processor(runtime.source, cfg.data), label="final")
    ctx.metrics.log("eval", 0, after)
    return StageResult(stage="eval", checkpoint=None, steps=0, wall_seconds=time.time() - started,
                       metrics={"eval_after": after})
