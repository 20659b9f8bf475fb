"""Runs under torchrun: builds the policy at a layout and runs megatron's own schedule on it.

Modes:
  parity  forward only; the last stage writes the (gathered) logits of every case;
  grads   forward + backward of a token log-likelihood loss over several micro-batches through
          megatron's DDP + finalize_model_grads; every rank writes its gradients under global
          megatron names, so the test can gather TP shards and compare with TP=1, PP=1.

Inputs come from a file written by the test (torch.save of plain tensors, read with
weights_only=True). Everything asserted is asserted by the test, not here.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_prism.models import build_policy
from megatron_prism.models.common.token_logprobs import next_token_targets
from megatron_prism.models.conversion.mapping import global_name


def _forward_step(cases, collect, mode, head_backend, data_iterator, model):
    from megatron_prism.models.qwen3vl.model import HeadRequest

    index = next(data_iterator)
    case = cases[index]
    targets = next_token_targets(case["input_ids"], case.get("attention_mask"))
    head = HeadRequest(targets, with_entropy=True, backend=head_backend) if head_backend else None
    out = model(
        case["input_ids"],
        pixel_values=case.get("pixel_values"),
        image_grid_thw=case.get("image_grid_thw"),
        attention_mask=case.get("attention_mask"),
        head=head,
    )

    def loss_func(output):
        if head is not None:
            token_logp, entropy = output.logp, output.entropy
        else:
            logits = output.float()
            token_logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
        mask = (targets != -100).float()
        if mode == "parity":
            collect[index] = output.detach().clone() if head is None else torch.stack([token_logp * mask, entropy]).detach()
            return token_logp.sum() * 0, {}
        # A log-likelihood plus a small entropy term, so the entropy gradient is checked too.
        loss = -((token_logp - 0.1 * entropy) * mask).sum() / mask.sum()
        collect[index] = loss.detach()
        return loss, {}

    return out, loss_func


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parity", "grads"])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--recompute", default="none")
    parser.add_argument("--head", default=None, choices=["triton", "torch"],
                        help="train through the fused log-prob head (this backend) instead of logits")
    args = parser.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    built = build_policy(
        args.ckpt, tp=args.tp, pp=args.pp, vpp=args.vpp,
        sequence_parallel=args.sp, recompute=args.recompute,
    )
    chunks = built if isinstance(built, list) else [built]
    cases = torch.load(args.inputs, weights_only=True)
    collect: dict[int, torch.Tensor] = {}
    config = chunks[0].config

    if args.mode == "grads":
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)
        chunks = [DistributedDataParallel(config, ddp_config, c) for c in chunks]
        for c in chunks:
            c.zero_grad_buffer()
        model_arg = chunks
    else:
        for c in chunks:
            c.eval()
        model_arg = chunks

    n = len(cases)
    iterators = [iter(range(n)) for _ in chunks] if args.vpp else iter(range(n))
    forward_backward = get_forward_backward_func()
    seq = max(c["input_ids"].shape[1] for c in cases)
    forward_backward(
        forward_step_func=functools.partial(_forward_step, cases, collect, args.mode, args.head),
        data_iterator=iterators,
        model=model_arg if args.vpp else model_arg[0],
        num_microbatches=n,
        seq_length=seq,
        micro_batch_size=cases[0]["input_ids"].shape[0],
        forward_only=args.mode == "parity",
    )
    if args.mode == "parity":
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            key = "logits" if args.head is None else "logp_entropy"
            save_file({f"{key}_{i}": t.contiguous() for i, t in collect.items()}, f"{args.out}/{key}.safetensors")
    else:
        finalize_model_grads(chunks)
        num_layers = config.num_layers
        grads = {}
        for vp_stage, c in enumerate(chunks):
            for name, p in c.module.named_parameters():
                g = getattr(p, "main_grad", None)
                if g is None:
                    g = p.grad
                gname = global_name(name, ps.get_pipeline_model_parallel_rank(), vp_stage, num_layers, args.pp, args.vpp)
                grads[gname] = g.detach().clone().contiguous()
        tp_rank = ps.get_tensor_model_parallel_rank()
        save_file(grads, f"{args.out}/grads_tp{tp_rank}_pp{ps.get_pipeline_model_parallel_rank()}.safetensors")
        if ps.is_pipeline_last_stage(ignore_virtual=True) and tp_rank == 0:
            save_file({f"loss_{i}": t.reshape(1) for i, t in collect.items()}, f"{args.out}/losses.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
