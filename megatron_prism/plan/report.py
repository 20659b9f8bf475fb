"""``prism plan CONFIG --nodes N --gpus-per-node G [--gpu-mem GIB]``: the config's layout checked
(or, with ``--auto`` or when it does not fit, one chosen) and printed as a per-GPU memory table.

Exit status: 0 when the config's layout fits (or ``--auto`` found one), 1 when it does not fit
(the reason names the component and, when one exists, the layout that would fit), 2 for input
errors (a bad config key, an unreadable config.json, a layout that does not divide the GPUs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron_prism.config.schema import PrismConfig
from megatron_prism.config.validate import check_config, sequences_per_prompt
from megatron_prism.plan.memory import (Assumptions, Estimate, GiB, HEADROOM_GIB, Layout, Workload, batch_problems,
                                        candidates, choose, estimate, stage_dp_limits, steps_per_hour)
from megatron_prism.plan.shapes import PRESETS, ModelShape, PlanError, resolve_policy_shape, shape_from_hf_config, tiny_shape


QWEN3VL_MAX_PIXELS = 16777216  # the released preprocessor_config.json's size.longest_edge


def discriminator_shape(cfg: PrismConfig) -> ModelShape | None:
    """The discriminator when WARMUP or ALIGN runs: its config.json (a dense Qwen3-VL is upcycled
    to ``discriminator.num_experts``), a preset named by its directory, or the tiny backbone."""
    if not any(n in cfg.stages and cfg.stages[n].enabled for n in ("warmup", "align")):
        return None
    disc = getattr(cfg, "discriminator", None)
    experts = getattr(disc, "num_experts", 4)
    hf = getattr(disc, "hf_dir", None) or (getattr(disc, "megatron_dir", None) and str(Path(disc.megatron_dir) / "hf"))
    if hf:
        path = Path(hf) / "config.json"
        if path.is_file():
            return shape_from_hf_config(json.loads(path.read_text()), str(path), num_experts=experts)
        base = None
        for name, shape in PRESETS.items():
            if name.replace("qwen3vl-", "") in Path(hf).name.lower().replace("qwen3-vl-", "").replace("_", "-"):
                base = shape
                break
        if base is None:
            raise PlanError(f"discriminator.hf_dir={hf}: no config.json there; download the discriminator's base "
                            f"model (PRISM: Qwen3-VL-2B-Instruct) there first")
    else:
        base = tiny_shape()
    return dataclasses.replace(base, name=f"{base.name} x{experts} experts",
                               text=dataclasses.replace(base.text, num_experts=experts))


def workload_from_config(cfg: PrismConfig) -> Workload:
    stages = {s.name: s.global_batch_size for s in cfg.enabled_stages()}
    samples = {name: sequences_per_prompt(cfg, name) for name in stages}
    # per-stage settings: plan for the largest response budget and the most mini-batches any stage uses
    views = [cfg.for_stage(name) for name in stages] or [cfg]
    return Workload(
        dtype="bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype, max_seq_len=cfg.data.max_seq_len,
        max_new_tokens=max(v.rollout.max_new_tokens for v in views),
        max_pixels=cfg.data.max_pixels or QWEN3VL_MAX_PIXELS, rollout_n=cfg.rollout.n, colocated=cfg.rollout.engine in ("sglang", "vllm"),
        kl_reference=any(v.algorithm.kl_coef > 0 for v in views), discriminator=discriminator_shape(cfg),
        disc_top_k=getattr(getattr(cfg, "discriminator", None), "topk", 2), stage_batches=stages,
        stage_samples=samples, mini_batches=max(v.algorithm.mini_batches for v in views),
        distributed_optimizer=cfg.optim.use_distributed_optimizer)


def config_layout(cfg: PrismConfig, world: int) -> Layout:
    p = cfg.parallel
    if world % (p.tp * p.pp):
        raise PlanError(f"parallel.tp={p.tp} x parallel.pp={p.pp} does not divide the {world} GPUs; choose TP and PP "
                        f"whose product divides nodes x gpus-per-node (or run with --auto)")
    return Layout(p.tp, p.pp, world // (p.tp * p.pp), vpp=p.vpp, sequence_parallel=p.sequence_parallel,
                  micro_batch_size=p.micro_batch_size, recompute=cfg.model.recompute, rollout_tp=1,
                  rollout_fraction=cfg.rollout.gpu_memory_fraction, disc_ep=p.ep)


def format_estimate(shape: ModelShape, est: Estimate, work: Workload, asm: Assumptions, title: str) -> str:
    lay, g = est.layout, est.gib
    lines = [f"== {title} ==",
             f"policy {shape.name}: {shape.total_params() / 1e9:.3f} B parameters; "
             f"TP={lay.tp} PP={lay.pp}{f' VPP={lay.vpp}' if lay.vpp else ''} DP={lay.dp} "
             f"SP={'on' if lay.sequence_parallel else 'off'} micro-batch={lay.micro_batch_size} recompute={lay.recompute}",
             f"per GPU, heaviest pipeline stage ({work.max_seq_len} tokens per sequence, {work.dtype}):"]
    rows = [("weights", g["weights"], f"{work.dtype}"),
            ("gradients", g["gradients"], "fp32 (grad_reduce_in_fp32)"),
            ("optimizer states", g["optimizer"], f"Adam fp32 master+m+v / DP={lay.dp} (distributed optimizer)" if work.distributed_optimizer
             else "Adam fp32 master+m+v, every rank (optim.use_distributed_optimizer=false)"),
            ("activations", g["activations"], f"recompute={lay.recompute}; none: {est.activations_none_gib:.1f}, "
                                              f"full: {est.activations_full_gib:.1f}"),
            ("reference policy", g["reference"], "algorithm.kl_coef > 0" if g["reference"] else "kl_coef = 0: none"),
            ("discriminator", g["discriminator"],
             f"{work.discriminator.name}, EP={lay.disc_ep}" if work.discriminator else "WARMUP/ALIGN disabled"),
            ("headroom", HEADROOM_GIB, "CUDA context, NCCL, fragmentation")]
    for name, val, why in rows:
        lines.append(f"  {name:<18} {val:8.2f} GiB  {why}")
    lines.append(f"  {'training peak':<18} {est.train_peak_gib:8.2f} GiB  of {est.gpu_gib:.0f} GiB")
    if work.colocated:
        lines.append(f"  {'rollout engine':<18} {lay.rollout_fraction * est.gpu_gib:8.2f} GiB  fraction "
                     f"{lay.rollout_fraction}, TP={lay.rollout_tp}: weights {g['rollout_weights']:.2f} + KV cache "
                     f"{g['rollout_kv_cache']:.2f} ({est.rollout_kv_tokens} tokens)")
    limits = stage_dp_limits(work, lay.micro_batch_size)
    if limits:
        lines.append(f"largest useful data-parallel size per stage (whole micro-batches on every rank; DP here "
                     f"{lay.dp}): " + ", ".join(f"{k} {v}" for k, v in limits.items()))
    rates = steps_per_hour(shape, lay, work, asm)
    if rates:
        lines.append("expected steps/hour (assumes " + f"{asm.peak_tflops:.0f} TFLOP/s peak x MFU {asm.mfu}, "
                     f"{asm.decode_tokens_per_s_per_gpu:.0f} decode tok/s/GPU, mean response "
                     f"{asm.mean_response_fraction:.0%} of max_new_tokens): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    lines.append("verdict: " + ("fits" if est.fits else "DOES NOT FIT: " + "; ".join(est.problems)))
    return "\n".join(lines)


def run_plan(cfg: PrismConfig, nodes: int, gpus_per_node: int, gpu_gib: float, *, preset: str | None,
             auto: bool, asm: Assumptions | None = None, json_out: str | None = None, source: str = "<config>",
             overrides: tuple[str, ...] | list[str] = ()) -> tuple[int, str]:
    """Returns (exit status, text to print). ``source``/``overrides`` name where a key that breaks
    a rule was set (as ``load_config`` was given them); such a key raises ``ConfigError``."""
    asm = asm or Assumptions()
    shape = resolve_policy_shape(cfg.model.hf_dir, cfg.model.megatron_dir, preset)
    world = nodes * gpus_per_node
    # The rules prism run applies, before anything is estimated; paths are not checked (planning
    # happens before the download), and the batch rule is reported per stage below.
    check_config(cfg, source=source, overrides=overrides, world_size=world, paths=False, layout=not auto,
                 batches=False, policy_shape=shape)
    work = workload_from_config(cfg)
    out: list[str] = []
    chosen = choose(shape, nodes, gpus_per_node, gpu_gib, work)
    status = 0
    best: Estimate | None = chosen
    if not auto:
        est = estimate(shape, config_layout(cfg, world), work, gpu_gib)
        out.append(format_estimate(shape, est, work, asm, f"config layout on {nodes} x {gpus_per_node} GPUs of {gpu_gib:.0f} GiB"))
        best = est
        if not est.fits:
            status = 1
            out.append("what would fit: " + (" ".join(chosen.layout.overrides()) + f" (rollout TP {chosen.layout.rollout_tp})"
                                            if chosen else _nothing_fits(shape, world, gpus_per_node, gpu_gib, work)))
    elif chosen is None:
        status = 1
        out.append(f"no layout fits {nodes} x {gpus_per_node} GPUs of {gpu_gib:.0f} GiB: " + _nothing_fits(shape, world, gpus_per_node, gpu_gib, work))
    else:
        out.append(format_estimate(shape, chosen, work, asm, f"chosen layout on {nodes} x {gpus_per_node} GPUs of {gpu_gib:.0f} GiB"))
        out.append("overrides: " + " ".join(chosen.layout.overrides()) + f"   (rollout TP {chosen.layout.rollout_tp})")
    if json_out and best is not None:
        Path(json_out).write_text(json.dumps({"fits": best.fits, "layout": dataclasses.asdict(best.layout),
                                              "gib": best.gib, "problems": best.problems}, indent=1))
    return status, "\n".join(out)


def _nothing_fits(shape: ModelShape, world: int, gpus_per_node: int, gpu_gib: float, work: Workload) -> str:
    """Why even the leanest layout fails: the stages' batches cannot use this many GPUs, or the
    sharded weights alone exceed the GPU."""
    layouts = candidates(shape, world, gpus_per_node, work)
    if layouts and all(batch_problems(work, lay) for lay in layouts):
        limits = stage_dp_limits(work, 1)
        return (f"no layout gives every stage whole micro-batches on {world} GPUs: the largest useful data-parallel "
                f"size per stage (at micro-batch 1) is " + ", ".join(f"{k} {v}" for k, v in limits.items())
                + "; use fewer GPUs or larger stages.<name>.global_batch_size")
    per_gpu_states = shape.total_params() * (2 + 4 + 12 / max(world, 1)) / min(world, 64) / GiB
    return (f"even sharded over all {world} GPUs the policy's weights + fp32 grads + Adam states need about "
            f"{per_gpu_states:.1f} GiB per GPU before activations and the rollout engine "
            f"(GPU: {gpu_gib:.0f} GiB); use more GPUs or larger GPUs")
