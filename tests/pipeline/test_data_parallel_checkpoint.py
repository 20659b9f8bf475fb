"""Two data-parallel replicas: their checkpoint holds every tensor once and converts to HF, and a
run killed between checkpoints resumes bit-exact with megatron's distributed optimizer.

Both replicas have the same weights and the same TP/PP rank, so both would write the same shard
file name; only DP rank 0 may write it (each tensor was listed twice in the manifest before, and
conversion stacked the two copies into a tensor of twice the size).

The distributed optimizer (the default) shards fp32 main params and Adam's moments over the two
ranks; its state_dict leaves them out, so each rank file carries the parameter state gathered on
data-parallel rank 0. Without it a resume continues from megatron's ``torch.empty`` placeholders.
"""

from __future__ import annotations

import json

import torch

from megatron_prism.models.conversion import convert_megatron_to_hf
from tests.pipeline.prism_proc import hf_tensors, kill_at, run_prism, shard_tensors, stage_checkpoint

DP2 = ["stages.rlvr.enabled=false", "stages.eval.enabled=false", "stages.sft.steps=2",
       "stages.sft.global_batch_size=4", "stages.sft.eval_every=0", "stages.sft.save_every=1",
       "parallel.micro_batch_size=2", "parallel.tp=1", "optim.warmup_steps=0"]


def test_dp2_checkpoint_lists_each_tensor_once_converts_and_resumes_exactly(warm, tmp_path):
    run_dir = tmp_path / "dp2"
    run_prism(run_dir, *warm.overrides(), *DP2, nproc=2, timeout=300)
    ckpt = stage_checkpoint(run_dir, "sft")
    assert ckpt.name == "step_00000002"
    held = [torch.load(ckpt / f"rank_{r:05d}.pt", weights_only=True)["optimizer"]["parameter_state"] for r in (0, 1)]
    assert held[0][0]["buckets_coalesced"] and held[1] == [None]  # gathered on data-parallel rank 0 only

    # killed after step 2's update, before its save: the rerun resumes from step 1
    killed = tmp_path / "killed"
    kill_at("sft.step@2", killed, [*warm.overrides(), *DP2], nproc=2)
    assert (killed / "sft" / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    run_prism(killed, *warm.overrides(), *DP2, nproc=2, timeout=300)
    ref, got = shard_tensors(ckpt), shard_tensors(stage_checkpoint(killed, "sft"))
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ after a DP=2 resume, e.g. {differ[:3]}"

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
