"""Runs under torchrun: builds the discriminator at a layout, one forward-backward of a weighted sum
of its scores through megatron's schedule, DDP and finalize_model_grads; writes the scores, the
load statistics and the gradients of the score head and the routers (global names). The test asserts."""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_prism.models.discriminator import build_discriminator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--dispatcher", default=None)
    args = parser.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = build_discriminator(args.ckpt, tp=args.tp, ep=args.ep, sequence_parallel=args.sp,
                                head_dropout=0.0, router_jitter=0.0)
    if args.dispatcher:
        for layer in model.language_model.decoder.layers:
            assert type(layer.mlp.token_dispatcher).__name__.lower().startswith(f"moe{args.dispatcher}")
    data = torch.load(args.inputs, weights_only=True)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    ddp.zero_grad_buffer()
    got = {}

    def step(iterator, m):
        next(iterator)
        out = m(data["input_ids"], data["pixel_values"], data["image_grid_thw"], data["attention_mask"],
                position_ids=data["position_ids"], part_labels=data["part_labels"],
                score_positions=data["score_positions"])

        def loss(scores):
            got["scores"] = scores.detach().clone()
            return (scores * data["weights"]).sum(), torch.tensor(1), {}

        return out, loss

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=ddp, num_microbatches=1,
                                seq_length=data["input_ids"].shape[1], micro_batch_size=data["input_ids"].shape[0])
    finalize_model_grads([ddp])
    grads = {}
    for name, p in model.global_named_parameters():
        if name == "score_head.weight" or name.endswith("router.weight"):
            grads[name] = p.main_grad.detach().clone()
    stats = model.moe_stats()
    rank = dist.get_rank()
    save_file({**grads, "scores": got["scores"], "load": stats["load"], "lb_loss": stats["lb_loss"],
               "dp": torch.tensor(ps.get_data_parallel_world_size())}, f"{args.out}/rank{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
