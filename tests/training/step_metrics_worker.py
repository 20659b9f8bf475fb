"""Runs under torchrun: one RLVR policy update and one SFT step at a layout; every rank writes the
figures it would log (``update_metrics`` / the SFT loss) to ``<out>/rank_R.json``.

The global batch is the same at every layout: data-parallel rank ``r`` of ``D`` takes the r-th
contiguous share of the samples. Everything asserted is asserted by the test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def samples(n: int) -> list[dict]:
    from megatron_prism.rollout import GenerationRequest, GenerationResult

    gen = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 200, (4 + i % 3,), generator=gen).tolist()
        response = torch.randint(0, 200, (3 + 2 * i,), generator=gen).tolist()
        out.append({"request": GenerationRequest(prompt, None, None, f"r{i}"),
                    "result": GenerationResult(f"r{i}", 0, response, [-1.0] * len(response), "stop"),
                    "advantage": float(i) - 1.5})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_prism.algorithms.aggregation import GlobalCounts, aggregate
    from megatron_prism.config.schema import ModelConfig, OptimizerConfig, ParallelConfig, PrismConfig
    from megatron_prism.stages import sft
    from megatron_prism.stages.policy_update import micro_batches, update_metrics, update_policy
    from megatron_prism.training.loop import Throughput
    from megatron_prism.training.runtime import PolicyRuntime, step_figures

    cfg = PrismConfig()
    cfg.algorithm.loss_backend = "torch"
    cfg.parallel.micro_batch_size = 1
    parallel = ParallelConfig(pp=args.pp)
    rt = PolicyRuntime.build(args.hf, ModelConfig(dtype="float32"), parallel, OptimizerConfig(lr=1e-3, clip_grad=1e9),
                             total_steps=4, seed=3, head_backend="torch")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    every = samples(8)
    share = len(every) // dp
    mine = every[dp_rank * share:(dp_rank + 1) * share]
    metrics, result = update_policy(cfg, rt, mine, None, Throughput(), pause="test.update")
    rl = update_metrics(cfg, metrics, result)

    # one SFT step on the same sequences (targets on the responses), the SFT stage's loss and counts
    mbs = micro_batches([{**s, "advantage": 0.0} for s in mine], 1, 1)
    counts = GlobalCounts(tokens=sft._global_tokens(mbs), seqs=1.0)

    def loss_fn(out, tensors):
        loss = aggregate(-out.logp, tensors["targets"] != -100, "token-mean", counts)
        return loss, {"nll_share": float(loss.detach())}

    rt.optimizer.zero_grad()
    reduced = rt.run(mbs, loss_fn)
    sft_result = rt.optimizer.step()
    nll = step_figures({"loss": sum(r["nll_share"] for r in reduced)} if reduced else {})
    record = {"rl_loss": rl["loss"], "rl_grad_norm": rl["grad_norm"], "rl_tokens": metrics["tokens"],
              "sft_loss": nll.get("loss", float("nan")), "sft_grad_norm": sft_result.grad_norm,
              "dp": dp, "pp": ps.get_pipeline_model_parallel_world_size()}
    Path(args.out, f"rank_{dist.get_rank()}.json").write_text(json.dumps(record))
    from megatron_prism.parallel.state import shutdown_parallel

    shutdown_parallel()


if __name__ == "__main__":
    main()
