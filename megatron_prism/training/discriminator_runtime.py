"""The discriminator as a stage trains it: megatron chunks in DDP, an optimizer configured from
``cfg.discriminator``, batched scoring and Bradley-Terry steps through megatron's schedules, and
resumable checkpoints.

Rows come in *pairs*: each micro-batch is one :class:`ScoreBatch` whose first half are teacher
demonstrations and second half the policy responses they are compared with (row ``i`` of the
teacher half pairs with row ``i`` of the policy half), so the Bradley-Terry loss of a pair is
computed inside one micro-batch.

Checkpoints (``<root>/step_N/``): ``model/`` in the discriminator's own format (what
:func:`build_discriminator` loads, at any layout), ``rank_RRRRR.pt`` (optimizer + LR schedule and
every RNG, as ``training.checkpoint``) and ``trainer_state.json``; written to ``.tmp-step_N`` and
renamed into place, ``latest`` names the newest, so a kill leaves the previous one intact.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_prism.config.schema import OptimizerConfig, PrismConfig
from megatron_prism.models.discriminator import (
    DiscriminatorSpec, PartFinder, ScoreBatch, ScoreItem, VisionTokens, build_discriminator, make_score_batch,
    save_discriminator,
)
from megatron_prism.parallel.devices import host_group, model_dtype, to_comm_device
from megatron_prism.training import checkpoint as ckpt
from megatron_prism.training.optimizer import PolicyOptimizer, StepResult
from megatron_prism.training.runtime import forward_backward, model_device, wrap_ddp

#: (teacher scores [k, 2], policy scores [k, 2], valid [k], pair index of each row) -> (loss share, metrics)
PairLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def disc_spec(cfg: PrismConfig) -> DiscriminatorSpec:
    """The discriminator's shape from the config; refuses settings the upcycler cannot honour."""
    d = cfg.discriminator
    if not d.norm_topk_prob:
        raise ValueError("discriminator.norm_topk_prob=false is not supported: the MoE normalises the top-k weights "
                         "(megatron moe_router_pre_softmax=False), which upcycling relies on to keep the dense function")
    for name in ("router_init_std", "head_init_std"):
        if getattr(d, name) != 0.02:
            raise ValueError(f"discriminator.{name}={getattr(d, name)} is not supported: the upcycler initialises "
                             "routers and the score head N(0, 0.02) (PRISM's value)")
    return DiscriminatorSpec(mode=d.mode, experts=d.num_experts, topk=d.topk, aux_loss_coeff=d.aux_loss_coef,
                             router_jitter=d.router_noise)


def optimizer_config(cfg: PrismConfig, stage: str, total_steps: int) -> OptimizerConfig:
    """WARMUP: ``warmup_lr`` with its schedule and warm-up ratio (PRISM: cosine, 10%); ALIGN:
    ``align_lr`` constant (verl's critic default). AdamW betas/eps are the run's ``optim`` ones."""
    d = cfg.discriminator
    if stage == "warmup":
        return replace(cfg.optim, lr=d.warmup_lr, min_lr=0.0, weight_decay=d.weight_decay, clip_grad=d.clip_grad,
                       schedule=d.warmup_lr_schedule, warmup_steps=math.ceil(d.warmup_lr_warmup_ratio * total_steps))
    return replace(cfg.optim, lr=d.align_lr, min_lr=d.align_lr, weight_decay=d.weight_decay, clip_grad=d.clip_grad,
                   schedule="constant", warmup_steps=0)


@dataclass
class DiscriminatorRuntime:
    chunks: list  # DDP-wrapped (trainable) or bare (frozen judge)
    hf_config: Any
    spec: DiscriminatorSpec
    finder: PartFinder
    pad_id: int
    multiple_of: int
    optimizer: PolicyOptimizer | None = None

    @classmethod
    def build(cls, source: str | Path, cfg: PrismConfig, tokenizer, *, pad_id: int, optim: OptimizerConfig | None,
              total_steps: int, seed: int, upcycle: DiscriminatorSpec | None = None) -> DiscriminatorRuntime:
        p, d = cfg.parallel, cfg.discriminator
        mode = None if upcycle is not None else d.mode
        spec = upcycle or disc_spec(cfg)
        # megatron's MoE at TP > 1 needs sequence parallelism; the discriminator is a model of its
        # own, so it turns SP on for itself whatever the policy does.
        sp = p.sequence_parallel or (p.tp > 1 and spec.is_moe)
        built = build_discriminator(source, tp=p.tp, pp=p.pp, ep=p.ep, vpp=p.vpp, mode=mode, sequence_parallel=sp,
                                    dtype=model_dtype(cfg.model.dtype), head_dropout=d.head_dropout, router_jitter=d.router_noise,
                                    seed=seed, upcycle=upcycle)
        chunks = built if isinstance(built, list) else [built]
        first = chunks[0]
        finder = PartFinder.from_tokenizer(tokenizer)
        if optim is None:
            for c in chunks:
                c.eval().requires_grad_(False)
            return cls(chunks, first.hf_config, first.spec, finder, pad_id, p.tp if sp else 1)
        chunks = wrap_ddp(chunks, distributed_optimizer=optim.use_distributed_optimizer)
        opt = PolicyOptimizer(chunks, optim, total_steps=total_steps, bf16=model_dtype(cfg.model.dtype) == "bfloat16")
        return cls(chunks, first.hf_config, first.spec, finder, pad_id, p.tp if sp else 1, opt)

    @property
    def models(self) -> list:
        return [getattr(c, "module", c) for c in self.chunks]

    def train(self, mode: bool = True) -> None:
        for c in self.chunks:
            c.train(mode)

    # --- batches ---------------------------------------------------------------------------

    def pair_batches(self, teacher: Sequence[ScoreItem], policy: Sequence[ScoreItem], pairs_per_batch: int,
                     ) -> list[ScoreBatch]:
        """Micro-batches of ``pairs_per_batch`` pairs: teacher rows, then their policy rows."""
        if len(teacher) != len(policy):
            raise ValueError(f"{len(teacher)} teacher rows but {len(policy)} policy rows")
        vision = VisionTokens.of(self.hf_config)
        out = []
        for start in range(0, len(policy), max(pairs_per_batch, 1)):
            rows = [*teacher[start:start + pairs_per_batch], *policy[start:start + pairs_per_batch]]
            out.append(make_score_batch(rows, self.finder, vision, pad_id=self.pad_id,
                                        text_only=self.spec.mode == "text-only", multiple_of=self.multiple_of))
        return out

    # --- forward(-backward) ----------------------------------------------------------------

    def _run(self, batches: Sequence[ScoreBatch], loss_fn: PairLossFn, *, forward_only: bool,
             collect: list[torch.Tensor] | None) -> list[dict]:
        device = model_device(self.chunks)

        def forward_step(index: int, model):
            b = _on_device(batches[index], device)  # the device boundary: model and loss inputs, once
            out = model(b.input_ids, **b.model_inputs())

            def loss_func(scores: torch.Tensor):
                k = scores.shape[0] // 2
                if collect is not None:
                    collect[index] = scores.detach().float()
                valid = b.valid[:k] & b.valid[k:]  # a pair counts when both responses have their parts
                loss, metrics = loss_fn(scores[:k], scores[k:], valid)
                return loss, torch.tensor(1, dtype=torch.int64, device=device), metrics

            return out, loss_func

        return forward_backward(self.chunks, forward_step, len(batches),
                                seq_length=max(b.input_ids.shape[1] for b in batches),
                                micro_batch_size=batches[0].input_ids.shape[0], forward_only=forward_only)

    def score(self, batches: Sequence[ScoreBatch]) -> list[torch.Tensor]:
        """Eval-mode scores ``[rows, 2]`` of every batch (no dropout, no router noise, no grad),
        on every rank (sent from the last pipeline stage), on the host: the game's bookkeeping
        (advantages, metrics) is host-side."""
        if not batches:
            return []
        self.train(False)
        got: list[torch.Tensor] = [torch.zeros(b.input_ids.shape[0], 2) for b in batches]
        with torch.no_grad():
            self._run(batches, lambda t, p, v: (t.sum() * 0, {}), forward_only=True, collect=got)
        return [t.cpu() for t in _from_last_stage(got)]

    def train_step(self, batches: Sequence[ScoreBatch], loss_fn: PairLossFn, *, aux_loss: bool) -> tuple[StepResult, list[dict]]:
        """One optimizer step over all ``batches`` (train mode: dropout and router noise on).
        ``loss_fn`` returns each micro-batch's share of the global loss. ``aux_loss``: add the MoE
        load-balancing loss, averaged over the micro-batches and data-parallel ranks."""
        self.train(True)
        scale = 1.0 / (len(batches) * ps.get_data_parallel_world_size()) if aux_loss else 0.0
        for m in self.models:
            m.set_aux_loss_scale(scale)
        self.optimizer.zero_grad()
        reduced = self._run(batches, loss_fn, forward_only=False, collect=None)
        return self.optimizer.step(), reduced

    def load_balance(self) -> dict[str, float]:
        """MoE routing since the last call: per layer, the busiest expert's share of the load over
        the mean share (1 = balanced), and the switch load-balancing loss (1 = balanced)."""
        stats = [m.moe_stats() for m in self.models]
        load = torch.cat([s["load"] for s in stats]) if stats else torch.zeros(0)
        lb = torch.cat([s["lb_loss"] for s in stats]) if stats else torch.zeros(0)
        if load.numel() == 0:
            return {}
        per_layer = load.sum(1)  # [layers, E] over parts
        ratio = per_layer.max(-1).values / per_layer.mean(-1).clamp(min=1e-9)
        return {"moe/max_over_mean_load": float(ratio.mean()), "moe/lb_loss": float(lb.mean())}

    # --- checkpoints -----------------------------------------------------------------------

    def healthy(self) -> bool:
        """Collective: no skip streak and finite weights on every rank (a save now would not
        poison a resume)."""
        return self._finite(self.optimizer is None or self.optimizer.skipped_in_a_row == 0)

    def _finite(self, local_ok: bool = True) -> bool:
        """Collective: ``local_ok`` and finite weights, on every rank."""
        ok = local_ok and all(bool(torch.isfinite(p).all()) for c in self.chunks for p in c.parameters())
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=host_group())  # collective (host, gloo): the health flag
        return bool(flag[0])

    def save(self, root: Path, step: int, trainer_state: dict[str, Any], *, keep_last: int = 2) -> Path:
        """Collective: model + optimizer + RNG at ``root/step_N`` (atomic rename), ``latest`` updated.
        Refuses (:class:`~megatron_prism.training.checkpoint.NonFiniteCheckpoint`) weights with a
        NaN/inf, leaving the previous checkpoint the newest."""
        from megatron_prism.training.integrity import tree_digests, write_json, write_safetensors, write_torch

        root = Path(root)
        if not self._finite():  # (collective: every rank refuses together, before any write)
            previous = ckpt.newest_complete(root)
            raise ckpt.NonFiniteCheckpoint(
                f"discriminator checkpoint at step {step} not written: the weights hold NaN/inf; "
                + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"))
        final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
        rank = dist.get_rank() if dist.is_initialized() else 0
        ok = torch.tensor([1], dtype=torch.int32)
        error = "another rank failed"
        hashed: dict[str, dict[str, Any]] = {}  # this rank's files, hashed while written
        try:
            if rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                ckpt.remove_stale_temporaries(root)
                tmp.mkdir()
            _barrier()

            def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
                # hashed while written (the weights are the bulk of the checkpoint)
                hashed[f"model/{path.name}"] = write_safetensors(path, tensors, metadata).to_json()

            save_discriminator(self.chunks, tmp / "model", write_shard=write_shard)
            state = {"optimizer": self.optimizer.state_dict() if self.optimizer else {}, "rng": ckpt.rng_state()}
            rank_file = f"rank_{rank:05d}.pt"
            hashed[rank_file] = write_torch(tmp / rank_file, state).to_json()
        except Exception as exc:  # noqa: BLE001 - any writer's failure (disk full): nothing half-written kept
            ok[0], error = 0, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=host_group())  # collective (host, gloo): the write phase's ok
        gathered = [hashed]
        if ok[0] and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, hashed, group=host_group())  # collective (host, gloo): file digests
        if ok[0] and rank == 0:
            try:
                world = dist.get_world_size() if dist.is_initialized() else 1
                write_json(tmp / ckpt.TRAINER_STATE, {**trainer_state, "step": step, "world_size": world})
                digests = {name: d for part in gathered for name, d in part.items()}
                # the small rest (manifest, config and tokenizer files, trainer state) hashed here
                digests.update({n: d.to_json() for n, d in tree_digests(tmp, skip=set(digests)).items()})
                ckpt.commit(root, tmp, step, digests, keep_last=keep_last)
            except Exception as exc:  # noqa: BLE001 - as above
                ok[0], error = 0, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if dist.is_initialized():
            dist.broadcast(ok, src=0, group=host_group())  # collective (host, gloo): rank 0's finalisation ok
        if not ok[0]:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier()
            previous = ckpt.newest_complete(root)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise ckpt.CheckpointWriteError(f"discriminator checkpoint at step {step} could not be written ({error}); "
                                            f"{kept}")
        _barrier()
        # The config/tokenizer files of later saves come from the newest checkpoint, never from
        # one that pruning may delete (e.g. the checkpoint a resumed run was built from).
        for chunk in self.chunks:
            getattr(chunk, "module", chunk).hf_files_dir = final / "model" / "hf"
        return final

    def load_state(self, path: Path, *, rng: bool = True) -> dict[str, Any]:
        """Optimizer (+ RNG unless ``rng=False``) of this rank from ``path`` (the model was built
        from ``path/model``); returns the trainer state."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        trainer = ckpt.verify_checkpoint(path, world)
        if trainer.get("world_size", world) != world:
            raise ckpt.CheckpointError(f"{path}: written by {trainer['world_size']} ranks, this job has {world}; "
                                       "resume with the same layout")
        loaded = ckpt.load_checkpoint(path)
        state = loaded.rank_state
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"], origin=str(loaded.rank_file))
        if rng:
            ckpt.set_rng_state(state["rng"])
        return trainer


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=host_group())  # host (gloo), as the policy checkpoint's


def _on_device(batch: ScoreBatch, device: torch.device) -> ScoreBatch:
    """``batch`` with every tensor moved (non-blocking) to ``device``."""
    moved = {f.name: getattr(batch, f.name) for f in fields(batch)}
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
    return replace(batch, **moved)


def _from_last_stage(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The last pipeline stage's tensors on every stage of its pipeline group."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tensors
    group = ps.get_pipeline_model_parallel_group()
    flat = torch.cat([to_comm_device(t.reshape(-1), group) for t in tensors])
    dist.broadcast(flat, src=ps.get_pipeline_model_parallel_last_rank(), group=group)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view_as(t))
        at += t.numel()
    return out
