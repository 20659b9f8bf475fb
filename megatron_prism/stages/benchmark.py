"""``prism eval``: k-sample evaluation of a checkpoint on the held-out split or on benchmarks.

The checkpoint (HF directory or megatron_prism checkpoint) is built as a frozen policy at the
config's layout, its weights are streamed to the rollout engine, and ``eval.evaluate`` scores k
samples per item with each record's rule-based reward: mean accuracy, its spread over samples and
pass@k, per benchmark and averaged; per-item scores are kept in the JSON report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from megatron_prism.config.schema import PrismConfig
from megatron_prism.data.loader import load_split
from megatron_prism.data.records import Record
from megatron_prism.eval import BenchmarkSpec
from megatron_prism.eval.evaluate import EvalReport, evaluate
from megatron_prism.eval.scoring import RewardScorer, scorer_from
from megatron_prism.rewards import get_reward
from megatron_prism.rollout import SamplingParams
from megatron_prism.rollout.client import RolloutClient
from megatron_prism.stages.common import (banned_ids, decode_responses, engine_settings, input_processor,
                                         prompt_requests)
from megatron_prism.training.runtime import PolicyRuntime


def load_eval_sets(cfg: PrismConfig, benchmarks: Sequence[BenchmarkSpec], split: str | None, *,
                   image_root: str | Path | None = None) -> dict[str, list[Record]]:
    """Every benchmark's records and the held-out split, read before anything is built (a bad path
    or row costs a second, not a model build)."""
    sets: dict[str, list[Record]] = {}
    for spec in benchmarks:
        key = spec.name if spec.split is None else f"{spec.name}:{spec.split}"
        sets[key] = spec.load(strict=not cfg.data.lenient, image_root=image_root)
    if split is not None:
        records, _ = load_split(split, "eval", strict=not cfg.data.lenient,
                                image_check_workers=cfg.data.image_check_workers)
        sets["heldout"] = records
    return sets


def evaluate_checkpoint(cfg: PrismConfig, checkpoint: str | Path, *, benchmarks: Sequence[BenchmarkSpec],
                        split: str | None, k: int, temperature: float, out: Path,
                        image_root: str | Path | None = None) -> EvalReport:
    from megatron_prism.parallel.state import init_parallel

    sets = load_eval_sets(cfg, benchmarks, split, image_root=image_root)
    p = cfg.parallel
    init_parallel(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, seed=cfg.run.seed)
    runtime = PolicyRuntime.build(checkpoint, cfg.model, p, None, total_steps=1, seed=cfg.run.seed, trainable=False)
    processor = input_processor(runtime.source, cfg.data)
    client = RolloutClient(engine_settings(cfg), runtime.source)
    client.sync(runtime)
    banned = banned_ids(processor, runtime.hf_config)

    def generate(records: list[Record], k: int, temperature: float, seed: int) -> list[list[str]]:
        requests, kept = prompt_requests(processor, records)
        sampling = SamplingParams(n=k, temperature=temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                                  max_new_tokens=cfg.rollout.max_new_tokens, stop_ids=[processor.im_end_id],
                                  seed=seed, banned_ids=banned)
        texts = decode_responses(processor, client.generate(requests, sampling))
        return [texts[i * k:(i + 1) * k] for i in range(len(records))]

    # Benchmark records name their reward (meta["reward"]); held-out records of the embedded task
    # do not, and are scored with the run's reward (its accuracy part).
    default = get_reward(cfg.algorithm.reward)
    by_record = RewardScorer()

    def held_out(response: str, record: Record) -> float:
        result = default(response, record.answer or "")
        return float(getattr(result, "details", {}).get("accuracy", float(result)))

    def scorer(records: list[Record], responses: list[list[str]]) -> list[list[float]]:
        named = [i for i, r in enumerate(records) if "reward" in r.meta]
        scores = scorer_from(held_out)(records, responses)
        if named:
            for i, row in zip(named, by_record([records[i] for i in named], [responses[i] for i in named])):
                scores[i] = row
        return scores

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    report = evaluate(sets, generate, k=k, temperature=temperature, seed=cfg.run.seed, scorer=scorer,
                      progress=(lambda line: print(line, flush=True)) if rank0 else None)
    client.shutdown()
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        report.save(out)
    return report
