"""Runs under torchrun (gloo, 2 ranks): the vocab-parallel half of test_fused_linear_logprob.

Each rank holds a contiguous shard of the vocab (the split need not be even) and the same hidden
states, runs both entry points of ``fused_linear_logprob`` on both engines with the TP group,
back-propagates ``sum(a * logp + b * entropy)``, and all-reduces grad_hidden itself, standing in
for megatron's copy_to_tensor_model_parallel_region. Everything is saved to ``--out``/rank{r}.pt;
the test does all the asserting against a single-process float64 oracle.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import kernels.fused_linear_logprob as flp


def _run(entry, engine, hidden, shard, targets, vocab_start, limit, group, a, b):
    hidden = hidden.clone().requires_grad_()
    shard = shard.clone().requires_grad_()
    # 5 rows per chunk: several chunks, a ragged last one, per-chunk all-reduces in lock step
    kw = dict(vocab_start=vocab_start, vocab_limit=limit, tp_group=group, with_entropy=True, engine=engine,
              chunk_bytes=5 * flp._row_bytes(engine, shard.shape[0], shard.dtype))
    if entry == "loss":
        loss, logp, entropy = flp.fused_linear_logprob_loss(
            hidden, shard, targets, lambda lp, en, rows: (lp * a[rows] + en * b[rows]).sum(), **kw)
    else:
        logp, entropy = flp.fused_linear_logprob(hidden, shard, targets, **kw)
        loss = (logp * a + entropy * b).sum()
    loss.backward()
    grad_hidden = hidden.grad.clone()
    dist.all_reduce(grad_hidden, group=group)  # the copy-to-TP-region backward
    return {"logp": logp.detach(), "entropy": entropy.detach(), "grad_hidden": grad_hidden, "grad_weight": shard.grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    flp.INTERPRET_BLOCK_V = 16  # each shard's rows span several vocab tiles and a ragged last one
    cases = torch.load(args.inputs, weights_only=True)
    results = []
    for case in cases:
        V = case["weight"].shape[0]
        per = -(-V // world)  # ceil split: 203 -> 102 / 101
        start, stop = rank * per, min(V, (rank + 1) * per)
        limit = None if case["limit"] < 0 else int(case["limit"])
        runs = {}
        for entry in ("general", "loss"):
            for engine in ("torch", "triton"):
                runs[f"{entry}/{engine}"] = _run(entry, engine, case["hidden"], case["weight"][start:stop],
                                                 case["targets"], start, limit, group, case["a"].float(),
                                                 case["b"].float())
        results.append({"vocab_start": start, "vocab_stop": stop, "runs": runs})
    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
