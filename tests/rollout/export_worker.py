"""Runs under torchrun: builds the policy at a layout and exports it with ``export_hf_weights``.

For every ``--ckpt`` (a tiny HF directory) each rank writes, under ``--out/<ckpt dir name>/``:
  full_rank{r}.safetensors   every tensor this rank received with ``dst_rank_only=False``;
  dst_rank{r}.safetensors    what it received with ``dst_rank_only=True`` (only destination ranks);
  info_rank{r}.json          names in export order, counts, the layout position, measure_export;
and with ``--perturb`` (on the first checkpoint), after adding 1.0 to TP rank 1's shard of layer 0's
qkv weight: perturbed_rank{r}.safetensors, layer 0's q/k/v as exported.
Everything asserted is asserted by the test, not here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_prism.models import build_policy
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.rollout.weight_sync import export_hf_weights, measure_export

QKV0 = "language_model.decoder.layers.0.self_attention.linear_qkv.weight"


def _save(named, path: Path) -> list[str]:
    tensors = {name: t.detach().clone().contiguous() for name, t in named}
    if tensors:
        save_file(tensors, str(path))
    return list(tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--perturb", action="store_true")
    args = parser.parse_args()

    from megatron.core import parallel_state as ps

    for index, ckpt in enumerate(args.ckpt):
        out = Path(args.out) / Path(ckpt).name
        out.mkdir(parents=True, exist_ok=True)
        hf_config = read_hf_config(ckpt)
        model = build_policy(ckpt, tp=args.tp, pp=args.pp, vpp=args.vpp)
        rank = dist.get_rank()
        order = [name for name, _ in export_hf_weights(model, hf_config)]
        full = _save(export_hf_weights(model, hf_config), out / f"full_rank{rank}.safetensors")
        dst = _save(export_hf_weights(model, hf_config, dst_rank_only=True), out / f"dst_rank{rank}.safetensors")
        stats = measure_export(model, hf_config)
        info = {"order": order, "full": len(full), "dst": len(dst), "tp_rank": ps.get_tensor_model_parallel_rank(),
                "pp_rank": ps.get_pipeline_model_parallel_rank(), "measure": stats}
        if args.perturb and index == 0:
            chunks = model if isinstance(model, list) else [model]
            if ps.get_pipeline_model_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 1:
                with torch.no_grad():
                    dict(chunks[0].named_parameters())[QKV0].add_(1.0)
            wanted = {f"model.language_model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
            _save(((n, t) for n, t in export_hf_weights(model, hf_config) if n in wanted),
                  out / f"perturbed_rank{rank}.safetensors")
        (out / f"info_rank{rank}.json").write_text(json.dumps(info))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
