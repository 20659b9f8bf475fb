"""``prism plan``: a layout and memory planner that says, before a job is queued, whether a config
fits N nodes x G GPUs of M GiB, and which layout would.

Per GPU it estimates (for the worst pipeline stage) the policy's weights, gradients, optimizer
states, activations, the MoE discriminator (WARMUP/ALIGN) and, colocated, the rollout engine's
weights and KV cache. The byte counts follow what this package allocates:

* weights in ``model.dtype``; gradients in fp32 (``grad_reduce_in_fp32=True`` in training/runtime.py);
* Adam: fp32 master weights + two moments = 12 bytes/param for bf16 (8 for fp32 weights), divided
  by DP with megatron's distributed optimizer (``optim.use_distributed_optimizer``, the default);
* activations per layer per micro-batch (bf16, no dropout, flash/SDPA attention, so no s^2 term):
  s*b*(8h + 4(a+2k)d + 2ad + 6f) bytes: the two norm inputs and two linear inputs (8h), Q/K/V
  before and after QK-norm/RoPE, the attention output, and SwiGLU's gate/up/product (6f). All of it
  is divided by TP with sequence parallelism (without SP the 4h of norm inputs is replicated).
  ``full`` recompute keeps each layer's 2sbh input plus one layer's working set; ``selective``
  recomputes core attention, which flash attention never stores: same as ``none`` here. 1F1B
  keeps ``pp`` micro-batches in flight on the first stage: L layer-micro-batches in all, times
  (1 + (pp-1)/(pp*vpp)) when interleaved. The vision tower (first stage, replicated over TP, not
  recomputed) adds the same formula over its patches.

Throughput is a stated-assumption estimate (peak TFLOPs x MFU for training, decode tokens/s per GPU
for generation), printed with its assumptions; it is for comparing layouts, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from megatron_prism.config.validate import TRAINING_STAGES, batch_split_problem, largest_dp_for
from megatron_prism.plan.shapes import PRESETS, ModelShape, PlanError

GiB = 1024 ** 3
HEADROOM_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    vpp: int | None = None
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    recompute: str = "none"
    rollout_tp: int = 1
    rollout_fraction: float = 0.5
    disc_ep: int = 1

    def overrides(self) -> list[str]:
        return [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}",
                f"parallel.vpp={'null' if self.vpp is None else self.vpp}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.micro_batch_size={self.micro_batch_size}", f"model.recompute={self.recompute}",
                f"parallel.ep={self.disc_ep}", f"rollout.gpu_memory_fraction={self.rollout_fraction}"]


@dataclass(frozen=True)
class Workload:
    """What the config asks of each GPU (read from PrismConfig by :func:`workload_from_config`)."""

    dtype: str = "bfloat16"
    max_seq_len: int = 8192
    max_new_tokens: int = 4096
    max_pixels: int = 1003520
    rollout_n: int = 16
    colocated: bool = True  # sglang/vllm share the GPU with training
    kl_reference: bool = False  # a frozen reference policy (algorithm.kl_coef > 0)
    discriminator: ModelShape | None = None  # WARMUP/ALIGN enabled
    disc_top_k: int = 2
    stage_batches: dict[str, int] = field(default_factory=dict)  # stage -> global batch size
    stage_samples: dict[str, int] = field(default_factory=dict)  # stage -> sequences per record (rollout.n, ...)
    mini_batches: int = 1  # algorithm.mini_batches: optimizer steps per pass of ALIGN/RLVR
    distributed_optimizer: bool = True  # optim.use_distributed_optimizer: Adam's state sharded over DP


def stage_dp_limits(work: Workload, micro_batch_size: int) -> dict[str, int]:
    """Per training stage, the largest data-parallel size its global batch can use (whole
    micro-batches on every rank); past it more GPUs cannot make the stage faster."""
    return {stage: largest_dp_for(stage, gbs, work.stage_samples.get(stage, 1), micro_batch_size)
            for stage, gbs in work.stage_batches.items() if stage in TRAINING_STAGES}


def batch_problems(work: Workload, lay: Layout) -> list[str]:
    """The stages whose global batch ``lay``'s data-parallel size cannot split into whole
    micro-batches (config/validate's rule), as one problem naming each stage's key."""
    limits = stage_dp_limits(work, lay.micro_batch_size)
    parts = []
    for stage, gbs in work.stage_batches.items():
        if stage not in TRAINING_STAGES:
            continue
        why = batch_split_problem(stage, gbs, work.stage_samples.get(stage, 1), lay.micro_batch_size, lay.dp,
                                  work.mini_batches)
        if why and limits[stage] and lay.dp > limits[stage]:
            parts.append(f"stages.{stage}.global_batch_size={gbs} (useful up to DP {limits[stage]})")
        elif why:
            parts.append(f"stages.{stage}.global_batch_size={gbs} {why}")
    if not parts:
        return []
    return [f"data parallelism: DP={lay.dp} cannot give every rank whole micro-batches of " + "; ".join(parts)
            + "; use fewer GPUs or larger global batches"]


@dataclass(frozen=True)
class Assumptions:
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.35
    decode_tokens_per_s_per_gpu: float = 1500.0
    mean_response_fraction: float = 0.5  # mean response length / max_new_tokens


@dataclass
class Estimate:
    layout: Layout
    gib: dict[str, float]  # component -> GiB per GPU (worst stage)
    activations_none_gib: float
    activations_full_gib: float
    gpu_gib: float
    rollout_kv_tokens: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def train_peak_gib(self) -> float:
        g = self.gib
        return (g["weights"] + g["gradients"] + g["optimizer"] + g["activations"] + g["reference"]
                + g["discriminator"] + HEADROOM_GIB)

    @property
    def fits(self) -> bool:
        return not self.problems


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _act_per_token(h: int, a: int, k: int, d: int, f: int, tp: int, sp: bool, gated: bool = True) -> float:
    split = 4 * h * (1 if sp else tp)  # norm inputs: divided by TP only with sequence parallelism
    rest = 4 * h + 4 * (a + 2 * k) * d + 2 * a * d + (6 if gated else 4) * f
    return (split + rest) / tp


def stage_params(shape: ModelShape, lay: Layout) -> int:
    """Parameters held by one GPU of the heaviest pipeline stage (first: vision + embedding; last:
    output layer, which with PP > 1 holds its own copy of tied embeddings)."""
    t = shape.text
    per_stage = -(-t.layers // lay.pp)
    layers = per_stage * (shape.layer_matrix_params() // lay.tp + shape.layer_replicated_params())
    emb = shape.embedding_params() // lay.tp
    first = layers + emb + shape.vision_params()
    output = 0 if (t.tied and lay.pp == 1) else emb
    last = layers + output + t.hidden
    return max(first, last) if lay.pp > 1 else first + output + t.hidden


def estimate(shape: ModelShape, lay: Layout, work: Workload, gpu_gib: float) -> Estimate:
    wb = _dtype_bytes(work.dtype)
    params = stage_params(shape, lay)
    opt_bytes = 12 if wb == 2 else 8
    t, v = shape.text, shape.vision
    tokens = lay.micro_batch_size * work.max_seq_len
    per_tok = _act_per_token(t.hidden, t.heads, t.kv_heads, t.head_dim, t.ffn, lay.tp, lay.sequence_parallel)
    per_layer_input = 2 * t.hidden / (lay.tp if lay.sequence_parallel else 1)
    stage_layers = -(-t.layers // lay.pp)
    in_flight = stage_layers * lay.pp * ((1 + (lay.pp - 1) / (lay.pp * lay.vpp)) if lay.vpp else 1.0)
    act_none = tokens * per_tok * in_flight
    act_full = tokens * (per_layer_input * in_flight + per_tok)
    patches = min(work.max_pixels // v.patch ** 2, work.max_seq_len * v.merge ** 2) * lay.micro_batch_size
    vision_act = patches * _act_per_token(v.hidden, v.heads, v.heads, v.hidden // v.heads, v.ffn, 1, False, gated=False) \
        * v.depth * lay.pp  # first stage: pp micro-batches in flight
    chosen = act_full if lay.recompute == "full" else act_none
    disc = 0.0
    if work.discriminator is not None:  # trained in ALIGN: weights + fp32 grads + Adam over DP; experts over EP
        d = work.discriminator
        world = lay.tp * lay.pp * lay.dp
        d_params = d.total_params() - d.text.layers * d.expert_params() * (1 - 1 / lay.disc_ep)
        disc = d_params * (wb + 4) + d_params * opt_bytes / (world if work.distributed_optimizer else 1)
        d_tokens = lay.micro_batch_size * work.max_seq_len
        disc += d_tokens * 2 * d.text.hidden * d.text.layers  # full recompute: one input per layer
    gib = {
        "weights": params * wb / GiB,
        "gradients": params * 4 / GiB,
        "optimizer": params * opt_bytes / (lay.dp if work.distributed_optimizer else 1) / GiB,
        "activations": (chosen + vision_act) / GiB,
        "reference": params * wb / GiB if work.kl_reference else 0.0,
        "discriminator": disc / GiB,
        "rollout_weights": 0.0,
        "rollout_kv_cache": 0.0,
    }
    est = Estimate(lay, gib, (act_none + vision_act) / GiB, (act_full + vision_act) / GiB, gpu_gib)
    if est.train_peak_gib > gpu_gib:
        est.problems.append(
            f"training does not fit: {est.train_peak_gib:.1f} GiB per GPU (weights {gib['weights']:.1f} + grads "
            f"{gib['gradients']:.1f} + optimizer {gib['optimizer']:.1f} + activations {gib['activations']:.1f} + reference "
            f"{gib['reference']:.1f} + discriminator {gib['discriminator']:.1f} + {HEADROOM_GIB:.0f} headroom) > {gpu_gib:.0f} GiB")
    if work.colocated:
        engine = lay.rollout_fraction * gpu_gib
        eng_w = shape.total_params() * 2 / lay.rollout_tp / GiB
        kv = engine - eng_w
        gib["rollout_weights"], gib["rollout_kv_cache"] = eng_w, max(kv, 0.0)
        est.rollout_kv_tokens = int(max(kv, 0) * GiB / (shape.kv_bytes_per_token() / lay.rollout_tp))
        need = work.max_seq_len  # prompt + response of one sequence
        resident = gib["weights"] + gib["gradients"] + gib["optimizer"] + gib["reference"] + gib["discriminator"]
        if kv <= 0 or est.rollout_kv_tokens < need:
            est.problems.append(
                f"rollout engine: rollout.gpu_memory_fraction={lay.rollout_fraction} gives {engine:.1f} GiB, of which its "
                f"weights take {eng_w:.1f} GiB at rollout TP={lay.rollout_tp}; the KV cache holds "
                f"{est.rollout_kv_tokens} tokens < one sequence ({need})")
        if resident + engine + HEADROOM_GIB > gpu_gib:
            est.problems.append(
                f"colocated rollout does not fit: training state kept on the GPU ({resident:.1f} GiB) + engine "
                f"({engine:.1f} GiB = fraction {lay.rollout_fraction}) + {HEADROOM_GIB:.0f} headroom > {gpu_gib:.0f} GiB")
    est.problems.extend(batch_problems(work, lay))
    return est


def _divisors(n: int, limit: int) -> list[int]:
    return [x for x in (1, 2, 4, 8, 16, 32, 64) if x <= limit and n % x == 0]


def candidates(shape: ModelShape, world: int, gpus_per_node: int, work: Workload) -> list[Layout]:
    """Every layout worth trying, cheapest communication first: TP within a node (dividing the
    KV heads), PP dividing the layers, then larger micro-batches before recomputation."""
    t = shape.text
    splits = [(tp, pp) for tp in _divisors(t.kv_heads, min(gpus_per_node, world))
              for pp in range(1, min(t.layers, 16) + 1) if t.layers % pp == 0 and world % (tp * pp) == 0]
    splits.sort(key=lambda s: (s[0] * s[1], s[1]))  # fewest model-parallel ranks, then TP (no bubble) over PP
    out = []
    for tp, pp in splits:
        for recompute in ("none", "full"):
            for mbs in (4, 2, 1):
                for rtp in _divisors(t.kv_heads, gpus_per_node):
                    out.append(Layout(tp, pp, world // (tp * pp), sequence_parallel=tp > 1, micro_batch_size=mbs,
                                      recompute=recompute, rollout_tp=rtp))
    return out


def _tune_rollout(shape: ModelShape, lay: Layout, work: Workload, gpu_gib: float) -> Layout:
    """The largest engine fraction that leaves room for the training state (capped at 0.9)."""
    probe = estimate(shape, replace(lay, rollout_fraction=0.0), replace(work, colocated=False), gpu_gib)
    g = probe.gib
    resident = g["weights"] + g["gradients"] + g["optimizer"] + g["reference"] + g["discriminator"]
    frac = min(0.9, (gpu_gib - resident - HEADROOM_GIB) / gpu_gib)
    return replace(lay, rollout_fraction=max(0.05, round(frac - 0.005, 2)))


def choose(shape: ModelShape, nodes: int, gpus_per_node: int, gpu_gib: float, work: Workload) -> Estimate | None:
    """The first fitting layout in :func:`candidates` order, or None if nothing fits."""
    world = nodes * gpus_per_node
    for lay in candidates(shape, world, gpus_per_node, work):
        if work.discriminator is not None:
            lay = replace(lay, disc_ep=min(_divisors(work.discriminator.text.num_experts, world)[-1], lay.dp))
        if work.colocated:
            lay = _tune_rollout(shape, lay, work, gpu_gib)
        est = estimate(shape, lay, work, gpu_gib)
        if est.fits:
            return est
    return None


def steps_per_hour(shape: ModelShape, lay: Layout, work: Workload, asm: Assumptions) -> dict[str, float]:
    """Expected optimizer steps per hour per stage, from the stated assumptions. A stage counts
    only the data-parallel ranks its global batch can use (:func:`stage_dp_limits`): past that
    size more GPUs do not make its steps faster."""
    flops_per_token = (8 if lay.recompute == "full" else 6) * shape.active_text_params()
    limits = stage_dp_limits(work, lay.micro_batch_size)
    out = {}
    for stage, gbs in work.stage_batches.items():
        dp = min(lay.dp, limits.get(stage) or lay.dp)
        world = lay.tp * lay.pp * dp
        train_rate = world * asm.peak_tflops * 1e12 * asm.mfu  # FLOP/s
        if stage in ("sft", "warmup"):
            seconds = gbs * work.max_seq_len * flops_per_token / train_rate
        elif stage in ("align", "rlvr"):
            response = asm.mean_response_fraction * work.max_new_tokens
            seqs = gbs * work.stage_samples.get(stage, work.rollout_n)
            gen = seqs * response / (world * asm.decode_tokens_per_s_per_gpu)
            # log-probs of old and reference policy, plus the update: ~ (2 + 6) / 6 of a training pass
            seconds = gen + seqs * (work.max_seq_len - work.max_new_tokens + response) * flops_per_token * 8 / 6 / train_rate
        else:
            continue
        out[stage] = 3600.0 / seconds if seconds > 0 else float("inf")
    return out


def preset_names() -> list[str]:
    return sorted(PRESETS)


__all__ = ["Assumptions", "Estimate", "Layout", "PlanError", "Workload", "batch_problems", "choose", "estimate",
           "stage_dp_limits", "stage_params",
           "steps_per_hour", "preset_names", "GiB", "HEADROOM_GIB"]
