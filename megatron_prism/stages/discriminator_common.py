"""What WARMUP and ALIGN share: the discriminator's starting weights, teacher/policy pairs, the
Bradley-Terry loss with global counts, pair metrics, and the held-out discriminator evaluation.

Held-out pairs: the last ``heldout_size(n)`` records of the ``align`` split are never trained on
by either stage; both stages evaluate the discriminator on the policy's responses to them
(sampled with a fixed seed) against their teacher demonstrations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_prism.algorithms.discriminator_loss import bradley_terry_loss
from megatron_prism.data.processing import InputProcessor
from megatron_prism.data.records import Record, RecordError, reason_of
from megatron_prism.models.discriminator import ScoreBatch, ScoreItem, is_discriminator_checkpoint, upcycle_to_checkpoint
from megatron_prism.rollout import GenerationRequest, GenerationResult, SamplingParams
from megatron_prism.rollout.client import RolloutClient
from megatron_prism.stages.common import banned_ids, prompt_requests
from megatron_prism.stages.policy_update import dp_sum, rollout_seed
from megatron_prism.training.discriminator_runtime import DiscriminatorRuntime, PairLossFn, disc_spec
from megatron_prism.training.loop import StageContext

log = logging.getLogger(__name__)

#: The pipeline-wide artifact name under which WARMUP hands its discriminator to ALIGN.
ARTIFACT = "discriminator"


#: Responses per held-out record: a mean over several samples is a steadier figure than one sample.
HELDOUT_SAMPLES = 4


def heldout_size(n: int) -> int:
    return min(32, max(1, n // 5)) if n > 1 else 0


def split_heldout(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records) of the align split: demonstrations only."""
    with_demo = [r for r in records if r.response is not None or (r.messages and r.messages[-1]["role"] == "assistant")]
    h = heldout_size(len(with_demo))
    return with_demo[:len(with_demo) - h], with_demo[len(with_demo) - h:]


def starting_discriminator(ctx: StageContext) -> Path:
    """The discriminator a stage starts from when no earlier stage handed one over:
    ``discriminator.megatron_dir`` as is; else ``discriminator.hf_dir`` upcycled; else the policy
    checkpoint the stage starts from (``ctx.source``, after SFT a backbone that already reads the
    task) upcycled. Upcycling writes ``<stage>/discriminator_init`` once (rank 0), so the expert
    noise ``upcycle_noise_std`` is applied as PRISM's create_vl_moe.py does and a rerun starts
    from the very same weights."""
    d = ctx.cfg.discriminator
    if d.megatron_dir:
        if not is_discriminator_checkpoint(d.megatron_dir):
            from megatron_prism.models.errors import CheckpointError

            raise CheckpointError(f"discriminator.megatron_dir={d.megatron_dir} is not a discriminator checkpoint; "
                                  "write one with tools/upcycle_discriminator.py")
        return Path(d.megatron_dir)
    backbone = Path(d.hf_dir) if d.hf_dir else Path(ctx.source)
    out = ctx.out_dir / "discriminator_init"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and not is_discriminator_checkpoint(out):
        upcycle_to_checkpoint(backbone, out, disc_spec(ctx.cfg), seed=ctx.cfg.run.seed,
                              expert_noise=d.upcycle_noise_std)
    if dist.is_initialized():
        dist.barrier()
    return out


def teacher_item(processor: InputProcessor, record: Record) -> ScoreItem:
    """The record's demonstration, tokenized as the SFT stage tokenizes it (with ``<|im_end|>``)."""
    demo = processor.demonstration(record)
    return ScoreItem(demo.input_ids[:demo.prompt_length], demo.input_ids[demo.prompt_length:], demo.pixel_values,
                     demo.image_grid_thw)


def policy_item(request: GenerationRequest, result: GenerationResult) -> ScoreItem:
    return ScoreItem(request.prompt_ids, result.response_ids, request.pixel_values, request.image_grid_thw)


def sample_pairs(ctx: StageContext, processor: InputProcessor, client: RolloutClient, hf_config,
                 records: Sequence[Record], *, n: int, seed: int, skips=None):
    """The policy's ``n`` responses per record at ``rollout.temperature`` and the teacher rows they
    pair with. Returns (requests, results, teacher items, policy items), one entry per response
    (requests/teachers repeated ``n`` times)."""
    ro = ctx.cfg.rollout
    kept_requests, kept = [], []
    teachers: list[ScoreItem] = []
    for rec in records:
        try:
            t = teacher_item(processor, rec)
        except RecordError as err:
            if skips is None:
                raise
            skips.skip(reason_of(err), str(err), key=rec.id)
            continue
        requests, _ = prompt_requests(processor, [rec])
        kept_requests += requests
        kept.append(rec)
        teachers.append(t)
    sampling = SamplingParams(n=n, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                              max_new_tokens=ro.max_new_tokens, stop_ids=[processor.im_end_id],
                              banned_ids=banned_ids(processor, hf_config), seed=seed)
    results = client.generate(kept_requests, sampling)
    requests = [r for r in kept_requests for _ in range(n)]
    teacher_rows = [t for t in teachers for _ in range(n)]
    policy_rows = [policy_item(q, r) for q, r in zip(requests, results)]
    return requests, results, teacher_rows, policy_rows


def pairs_per_micro_batch(cfg, pairs: int) -> int:
    """Pairs per discriminator micro-batch for a rank's ``pairs`` of one step:
    ``discriminator.micro_batch_pairs`` (null: ``parallel.micro_batch_size``), lowered to the
    largest divisor of ``pairs``, so that every micro-batch has the same shape (megatron's pipeline
    schedule sends fixed-shape activations between stages)."""
    want = cfg.discriminator.micro_batch_pairs or cfg.parallel.micro_batch_size
    want = max(1, min(want, pairs))
    return next(k for k in range(want, 0, -1) if pairs % k == 0)


def pair_loss(batches: Sequence[ScoreBatch], *, score_l2: float, part_reduction: str, score_clip: float | None,
              fallback_coef: float) -> PairLossFn:
    """Bradley-Terry shares of one global batch: pair losses divide by the global number of valid
    pairs, and the score L2 and the no-valid fallback are rescaled so that the shares of all
    micro-batches and data-parallel ranks add up to the global-batch loss."""
    valid_local = sum(int((b.valid[: len(b.valid) // 2] & b.valid[len(b.valid) // 2:]).sum()) for b in batches)
    l2_local = sum(len(b.valid) + 2 * int((b.valid[: len(b.valid) // 2] & b.valid[len(b.valid) // 2:]).sum())
                   for b in batches)
    valid, l2_denom, shares = dp_sum([valid_local, l2_local, len(batches)])

    def loss_fn(teacher: torch.Tensor, policy: torch.Tensor, ok: torch.Tensor):
        here = teacher.numel() + 2 * float(ok.sum())
        loss, m = bradley_terry_loss(teacher, policy, ok, score_l2=score_l2 * here / max(l2_denom, 1.0),
                                     score_clip=score_clip, part_reduction=part_reduction,
                                     num_valid=[valid, valid], fallback_coef=fallback_coef / shares)
        right = ((teacher - policy) > 0).float() * ok.float().unsqueeze(1)
        return loss, {"loss": float(loss.detach()), "pairs_valid": float(ok.sum()),
                      "caption_right": float(right[:, 0].sum()), "reasoning_right": float(right[:, 1].sum())}

    return loss_fn


def train_figures(reduced: list[dict]) -> dict[str, float]:
    """Loss and train-mode pair accuracy of a discriminator step from its micro-batch dicts."""
    total = {k: sum(r[k] for r in reduced) for k in ("loss", "pairs_valid", "caption_right", "reasoning_right")} \
        if reduced else {}
    if not total:
        return {}
    n = total["pairs_valid"]
    return {"disc/train_loss": total["loss"], "disc/train_caption_acc": total["caption_right"] / n if n else float("nan"),
            "disc/train_reasoning_acc": total["reasoning_right"] / n if n else float("nan")}


def split_scores(scores: Sequence[torch.Tensor], batches: Sequence[ScoreBatch]):
    """(teacher [B, 2], policy [B, 2], pair valid [B], policy valid [B]) from per-batch scores."""
    teacher, policy, valid, policy_valid = [], [], [], []
    for s, b in zip(scores, batches):
        k = s.shape[0] // 2
        teacher.append(s[:k])
        policy.append(s[k:])
        valid.append(b.valid[:k] & b.valid[k:])
        policy_valid.append(b.valid[k:])
    return torch.cat(teacher), torch.cat(policy), torch.cat(valid), torch.cat(policy_valid)


def pair_metrics(teacher: torch.Tensor, policy: torch.Tensor, valid: torch.Tensor, policy_valid: torch.Tensor,
                 *, score_clip: float | None, weights: tuple[float, float] = (0.5, 0.5), invalid_offset: float = 1.0,
                 prefix: str = "disc/") -> dict[str, float]:
    """Per part: accuracy (teacher above policy), gap, teacher and policy means (valid pairs); the
    policy's invalid rate and :func:`game_objective`. This rank's pairs."""
    with torch.no_grad():
        _, m = bradley_terry_loss(teacher.double(), policy.double(), valid, score_clip=score_clip)
    keep = ("acc", "gap", "teacher_mean", "policy_mean")
    out = {f"{prefix}{k.split('/', 1)[1]}": v for k, v in m.items() if k.rsplit("/", 1)[-1] in keep}
    out[f"{prefix}invalid_rate"] = float((~policy_valid).float().mean()) if policy_valid.numel() else float("nan")
    out[f"{prefix}objective"] = game_objective(policy, policy_valid, weights, invalid_offset, score_clip)
    return out


def game_objective(policy: torch.Tensor, policy_valid: torch.Tensor, weights: tuple[float, float],
                   invalid_offset: float, score_clip: float | None) -> float:
    """What the policy's side of the game maximises, over a set of responses: the weighted clipped
    part score, an invalid response counting as (the set's lowest valid score - ``invalid_offset``)
    as ``prism_game`` treats it within a group. A mean over valid responses alone would hide a
    policy that trades format errors for valid responses with lower scores."""
    if not policy_valid.numel():
        return float("nan")
    s = policy.double().clamp(-score_clip, score_clip) if score_clip is not None else policy.double()
    combined = s @ torch.tensor(weights, dtype=torch.float64)
    floor = (combined[policy_valid].min() if policy_valid.any() else torch.tensor(0.0, dtype=torch.float64)) \
        - invalid_offset
    return float(torch.where(policy_valid, combined, floor).mean())


def heldout_eval(ctx: StageContext, disc: DiscriminatorRuntime, processor: InputProcessor, client: RolloutClient,
                 hf_config, records: Sequence[Record], *, pairs=None, label: str, prefix: str = "heldout/"):
    """Discriminator figures on the held-out pairs (fixed sampling seed, ``HELDOUT_SAMPLES``
    responses per record at ``rollout.temperature``).
    ``pairs`` reuses earlier responses (teacher rows, policy rows) instead of sampling. Returns
    (figures, pairs)."""
    if not records:
        return {}, ([], [])
    if pairs is None:
        _, _, teachers, policies = sample_pairs(ctx, processor, client, hf_config, records, n=HELDOUT_SAMPLES,
                                                seed=rollout_seed(ctx.cfg.run.seed, 7919))
        pairs = (teachers, policies)
    batches = disc.pair_batches(pairs[0], pairs[1], pairs_per_micro_batch(ctx.cfg, len(pairs[1])))
    game = ctx.cfg.align
    out = pair_metrics(*split_scores(disc.score(batches), batches), score_clip=game.score_clip, prefix=prefix,
                       weights=(game.caption_weight, game.reasoning_weight), invalid_offset=game.invalid_offset)
    log.info("%s held-out discriminator (%s): %s", ctx.stage.name, label,
             ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in out.items()))
    return out, pairs
