"""A checkpoint written by two data-parallel replicas holds every tensor once and converts to HF.

Both replicas have the same weights and the same TP/PP rank, so both would write the same shard
file name; only DP rank 0 may write it (each tensor was listed twice in the manifest before, and
conversion stacked the two copies into a tensor of twice the size).
"""

from __future__ import annotations

import json

import torch

from megatron_prism.models.conversion import convert_megatron_to_hf
from tests.pipeline.prism_proc import hf_tensors, run_prism, stage_checkpoint


def test_dp2_checkpoint_lists_each_tensor_once_and_converts(warm, tmp_path):
    run_dir = tmp_path / "dp2"
    run_prism(run_dir, *warm.overrides(), "stages.rlvr.enabled=false", "stages.eval.enabled=false",
              "stages.sft.steps=1", "stages.sft.global_batch_size=4", "stages.sft.eval_every=0",
              "optim.warmup_steps=0", "parallel.micro_batch_size=2", "parallel.tp=1", nproc=2, timeout=300)
    ckpt = stage_checkpoint(run_dir, "sft")
    manifest = json.loads((ckpt / "prism_checkpoint.json").read_text())
    assert manifest["weight_map"] and all(files == ["mp_rank_00_000.safetensors"]
                                          for files in manifest["weight_map"].values())
    out = convert_megatron_to_hf(ckpt, tmp_path / "hf")
    from safetensors.torch import load_file

    converted = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    expected = hf_tensors(ckpt)
    assert converted.keys() >= expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name
