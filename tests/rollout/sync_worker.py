"""Runs under torchrun (2 gloo processes, TP=2): trains a policy, syncs it into an embedded engine.

For every ``--hf`` (a tiny HF directory ``<name>``), under ``--out/<name>/``:

1. builds the TP=2 policy with :meth:`PolicyRuntime.build` (Adam, lr 1e-2, so every weight that
   gets a gradient moves) and trains ``--steps`` optimizer steps of next-token NLL over a text
   micro-batch and an image micro-batch (no loss on image pads) through ``runtime.run`` (megatron's schedule);
2. TP rank 0 builds an :class:`EmbeddedEngine` from the ORIGINAL HF directory, records its
   prompt logits (``logits_before``), then ``sync_weights(engine, runtime.chunks, ...)`` streams
   the trained policy into it (the other rank passes ``engine=None`` and only joins the export's
   collectives);
3. every rank takes part in ``save_checkpoint(<out>/<name>/ckpt, steps, ...)``;
4. rank 0 writes ``engine.pt``: the synced engine's prompt logits and greedy generations for
   :func:`probe_requests`, ``logits_before``, the sync stats, the checkpoint path; and
   ``engine_weights.safetensors``: every HF-named tensor the engine holds after the sync.

The test converts the checkpoint with ``convert_megatron_to_hf``, loads a second engine from it
and compares. Everything asserted is asserted by the test, not here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_prism.models.qwen3vl.tiny import TOKENS
from megatron_prism.rollout.interface import GenerationRequest, SamplingParams
from tests.models.cases import IMG, PATCH_DIM, VE, VS, make_case

STEPS = 2
LR = 1e-2
# greedy, never emitting a vision token (the tiny models like to predict image pads)
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=8, banned_ids=tuple(TOKENS.values()))
# (text tokens before, image grids [t, h, w] in patches): text-only and image prompts
PROBES = [(5, []), (2, [[1, 4, 4]]), (9, []), (1, [[1, 4, 4], [1, 2, 6]])]


def probe_requests(seed: int = 7) -> list[GenerationRequest]:
    """The prompts both engines are asked about (deterministic: the test builds them again)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (pre, grids) in enumerate(PROBES):
        ids = torch.randint(0, 240, (pre,), generator=gen).tolist()
        for t, h, w in grids:
            ids += [VS] + [IMG] * (t * h * w // 4) + [VE] + torch.randint(0, 240, (2,), generator=gen).tolist()
        ids += torch.randint(0, 240, (3,), generator=gen).tolist()
        thw = torch.tensor(grids) if grids else None
        pv = torch.randn(int(thw.prod(-1).sum()), PATCH_DIM, generator=gen) if grids else None
        out.append(GenerationRequest(ids, pv, thw, f"probe{i}"))
    return out


def probe(engine) -> dict:
    """What the test compares: prompt logits and greedy generations of :func:`probe_requests`."""
    requests = probe_requests()
    results = engine.generate(requests, GREEDY)
    return {
        "logits": engine.prompt_logits(requests),
        "greedy": [r.response_ids for r in results],
        "greedy_logprobs": torch.tensor([r.logprobs for r in results], dtype=torch.float32),
    }


def _micro_batches(step: int):
    from megatron_prism.models.common.token_logprobs import next_token_targets
    from megatron_prism.training.runtime import MicroBatch

    cases = [make_case([[], []], seed=100 + step), make_case([[[1, 4, 4]]], seed=200 + step)]
    out = []
    for case in cases:
        targets = next_token_targets(case["input_ids"], case.get("attention_mask"))
        targets[targets == IMG] = -100  # no loss on predicting image pads, as in SFT
        out.append(MicroBatch({**case, "targets": targets}, num_tokens=int((targets != -100).sum())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()

    from megatron_prism.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from megatron_prism.rollout.embedded import EmbeddedEngine
    from megatron_prism.rollout.weight_sync import is_export_destination, sync_weights
    from megatron_prism.training.checkpoint import save_checkpoint
    from megatron_prism.training.runtime import PolicyRuntime

    for hf_dir in map(Path, args.hf):
        out = Path(args.out) / hf_dir.name
        out.mkdir(parents=True, exist_ok=True)
        runtime = PolicyRuntime.build(hf_dir, ModelConfig(dtype="float32"), ParallelConfig(tp=args.tp),
                                      OptimizerConfig(lr=LR, clip_grad=1.0), total_steps=STEPS, seed=5)
        losses, updated = [], []
        for step in range(STEPS):
            micro_batches = _micro_batches(step)
            total = float(sum(mb.num_tokens for mb in micro_batches))

            def loss_fn(output, tensors):
                mask = (tensors["targets"] != -100).to(output.logp.dtype)
                loss = -(output.logp * mask).sum() / total
                return loss, {"nll_share": float(loss.detach())}

            runtime.train()
            runtime.optimizer.zero_grad()
            reduced = runtime.run(micro_batches, loss_fn)
            updated.append(runtime.optimizer.step().updated)
            losses.append(sum(r["nll_share"] for r in reduced))

        engine = None
        before = None
        if is_export_destination():
            engine = EmbeddedEngine(hf_dir, num_threads=1)
            before = engine.prompt_logits(probe_requests())
        stats = sync_weights(engine, runtime.chunks, runtime.hf_config, bucket_bytes=1 << 16, version=STEPS)
        ckpt = save_checkpoint(out / "ckpt", STEPS, chunks=runtime.chunks, hf_config=runtime.hf_config,
                               hf_files_dir=hf_dir, optimizer_state={}, trainer_state={"step": STEPS})
        if engine is not None:
            record = {"logits_before": before, **probe(engine), "stats": stats, "losses": losses,
                      "updated": updated, "version": engine.weight_version, "checkpoint": str(ckpt)}
            torch.save(record, out / "engine.pt")
            save_file({n: t.detach().clone().contiguous() for n, t in engine.weights.names.items()},
                      str(out / "engine_weights.safetensors"))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
