"""Runs under torchrun (gloo, 2 ranks): the vocab-parallel half of test_fused_linear_logprob.

Each rank holds a contiguous shard of the vocab (the split need not be even) and the same hidden
states, runs ``fused_linear_logprob`` (and ``linear_logprob_reference``) with the TP group,
back-propagates ``sum(a * logp + b * entropy)``, and all-reduces grad_hidden itself, standing in
for megatron's copy_to_tensor_model_parallel_region. Everything is saved to ``--out``/rank{r}.pt;
the test does all the asserting against a single-process float64 reference.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import kernels.fused_linear_logprob as flp


def _run(fn, hidden, shard, targets, vocab_start, group, a, b):
    hidden = hidden.clone().requires_grad_()
    shard = shard.clone().requires_grad_()
    logp, entropy = fn(hidden, shard, targets, vocab_start=vocab_start, tp_group=group, with_entropy=True)
    (logp * a + entropy * b).sum().backward()
    grad_hidden = hidden.grad.clone()
    dist.all_reduce(grad_hidden, group=group)  # the copy-to-TP-region backward
    return {"logp": logp.detach(), "entropy": entropy.detach(), "grad_hidden": grad_hidden,
            "grad_weight": shard.grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    # small tiles, so each shard spans several vocab blocks and a ragged last one
    flp.BLOCKS = flp.Blocks(t=16, v=32, h=16)
    cases = torch.load(args.inputs, weights_only=True)
    results = []
    for case in cases:
        V = case["weight"].shape[0]
        # ceil split: 203 -> 102 / 101
        per = -(-V // world)
        start, stop = rank * per, min(V, (rank + 1) * per)
        out = {"vocab_start": start, "vocab_stop": stop}
        for name, fn, dtype in (("fused", flp.fused_linear_logprob, torch.float32),
                                ("reference", flp.linear_logprob_reference, torch.float64)):
            res = _run(fn, case["hidden"].to(dtype), case["weight"][start:stop].to(dtype),
                       case["targets"], start, group, case["a"].to(dtype), case["b"].to(dtype))
            out.update({f"{name}_{k}": v for k, v in res.items()})
        results.append(out)
    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
