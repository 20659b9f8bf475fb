"""Runs under torchrun (2 gloo processes, TP=1, rollout.tp=2): both ranks share ONE embedded engine.

Rank 0 leads the engine group (``parallel.rollout_groups``); rank 1 holds no engine. Each rank
asks for its own prompts; the leader generates both (slowly: ``--delay`` seconds per generate, so
that rank 1 really waits in the gloo group) and scatters the results. Every rank writes
``rank{r}.pt``: its results, whether it holds an engine, the wait group's backend, and the error
it got, if any. With ``--timeout`` shorter than ``--delay`` rank 1 must fail in the wait, not hang.
Everything is asserted by the test.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megatron_prism.models import build_policy
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.parallel.state import init_parallel, shutdown_parallel
from megatron_prism.rollout import GenerationRequest, SamplingParams
from megatron_prism.rollout.client import EngineSettings, RolloutClient


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    init_parallel(tp=1, pp=1)
    rank = dist.get_rank()
    runtime = SimpleNamespace(chunks=[build_policy(args.hf)], hf_config=read_hf_config(args.hf))
    client = RolloutClient(EngineSettings(engine="embedded", tp=2, wait_timeout_s=args.timeout), args.hf)
    record: dict = {}
    try:
        client.sync(runtime)
        if client.engine is not None and args.delay:
            real = client.engine.generate

            def slow(*a, **k):
                time.sleep(args.delay)
                return real(*a, **k)

            client.engine.generate = slow
        prompts = [GenerationRequest([5 + rank, 17, 42], request_id=f"rank{rank}")]
        results = client.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=5, seed=rank))
        record["results"] = [(r.request_id, r.sample_index, r.response_ids) for r in results]
        # what rank 0's engine gives for rank 1's prompts, for the test to compare with
        if client.engine is not None:
            client.sync(runtime)
            other = [GenerationRequest([6, 17, 42], request_id="rank1")]
            again = client.engine.generate(other, SamplingParams(n=2, temperature=1.0, max_new_tokens=5, seed=1))
            record["leader_for_rank1"] = [(r.request_id, r.sample_index, r.response_ids) for r in again]
    except Exception as err:  # noqa: BLE001 -- recorded for the test
        record["error"] = f"{type(err).__name__}: {err}"
    record["has_engine"] = client.engine is not None
    record["backend"] = dist.get_backend(client._group)
    record["group"] = list(client._ranks)
    torch.save(record, Path(args.out) / f"rank{rank}.pt")
    if "error" in record:
        os._exit(0)  # a group whose peer gave up cannot be torn down cleanly; the record says what happened
    shutdown_parallel()


if __name__ == "__main__":
    main()
