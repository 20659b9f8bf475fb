"""Command-line face of upcycling (``tools/upcycle_discriminator.py``)."""

from __future__ import annotations

import argparse
import sys

from megatron_prism.config.validate import positive_int
from megatron_prism.models.discriminator.spec import MODES, DiscriminatorSpec
from megatron_prism.models.errors import CheckpointError


def upcycle_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Upcycle a dense Qwen3-VL (HF directory or megatron_prism checkpoint) into a PRISM "
                    "discriminator checkpoint: MoE experts copied from the dense MLPs, a router and a score head.")
    parser.add_argument("--hf-dir", required=True, help="the backbone: HF Qwen3-VL directory or policy checkpoint")
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    parser.add_argument("--experts", type=positive_int, default=4, help="experts per layer (PRISM: 4)")
    parser.add_argument("--topk", type=positive_int, default=2, help="experts per token (PRISM: 2)")
    parser.add_argument("--mode", choices=MODES, default="routed")
    parser.add_argument("--perception-experts", type=int, default=None,
                        help="dedicated mode: experts serving caption tokens (default experts // 2)")
    parser.add_argument("--aux-loss-coeff", type=float, default=0.01, help="load-balancing loss weight as PRISM (Hugging Face) means it: 0.01; converted to megatron's per-layer loss")
    parser.add_argument("--router-jitter", type=float, default=0.0,
                        help="router input noise eps (0 = off, as PRISM's router)")
    parser.add_argument("--expert-noise", type=float, default=0.01,
                        help="std of noise added to each expert copy (PRISM's 0.01; 0 keeps the dense function)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router and score-head init")
    args = parser.parse_args(argv)
    from megatron_prism.models.discriminator.checkpoint import upcycle_to_checkpoint

    try:
        spec = DiscriminatorSpec(mode=args.mode, experts=args.experts, topk=args.topk,
                                 perception_experts=args.perception_experts, aux_loss_coeff=args.aux_loss_coeff,
                                 router_jitter=args.router_jitter)
        out = upcycle_to_checkpoint(args.hf_dir, args.out, spec, seed=args.seed, expert_noise=args.expert_noise)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
