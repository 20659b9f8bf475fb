"""torchrun worker (DP=2, gloo): megatron's distributed optimizer trains on CPU; saved after 2 steps
(model, optimizer state dict, parameter state) and resumed into freshly built objects, step 3 is
compared with the uninterrupted run's. ``--skip-parameter-state`` resumes from the state dict
alone (what the project did before), to show that this is not exact."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_prism.parallel import cpu_compat  # noqa: E402
from megatron_prism.training import optimizer_state  # noqa: E402


def build(hf_dir: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_prism.models import build_policy

    model = build_policy(hf_dir, seed=7)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    with cpu_compat.distributed_optimizer_types():
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=3e-3, use_distributed_optimizer=True, clip_grad=0.0), [ddp])
    return ddp, opt


def step(ddp, opt, k: int) -> float:
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1000 * k + rank)  # each DP rank its own batch
    ids = torch.randint(0, 240, (2, 12), generator=gen)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    logits = ddp(ids).float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    ddp.finish_grad_sync()
    updated, _, _ = opt.step()
    assert updated
    return float(loss)


def params(ddp) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in ddp.module.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-parameter-state", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    cpu_compat.install()
    ddp, opt = build(args.hf)
    kinds = {type(p).__name__ for p in getattr(opt, "chained_optimizers", [opt])}
    for k in range(2):
        step(ddp, opt, k)
    rank = dist.get_rank()
    if rank == 0:
        torch.save({k: v.clone() for k, v in ddp.module.state_dict().items() if not k.endswith("_extra_state")},
                   out / "model.pt")
        torch.save(opt.state_dict(), out / "optimizer.pt")
    torch.save(optimizer_state.gather_parameter_state(opt), out / f"param_state_rank{rank}.pt")
    dist.barrier()
    loss_uninterrupted = step(ddp, opt, 2)
    want = params(ddp)

    ddp, opt = build(args.hf)  # fresh objects, as a resumed process has
    ddp.module.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=False)
    opt.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True))
    if not args.skip_parameter_state:
        states = torch.load(out / f"param_state_rank{rank}.pt", weights_only=True)
        optimizer_state.scatter_parameter_state(opt, states, origin="param_state.pt")
    loss_resumed = step(ddp, opt, 2)
    got = params(ddp)
    result = {"optimizers": sorted(kinds), "max_abs_diff": float((got - want).abs().max()),
              "loss_uninterrupted": loss_uninterrupted, "loss_resumed": loss_resumed}
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
