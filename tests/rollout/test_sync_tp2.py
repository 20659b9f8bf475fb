"""Weight sync from a trained TP=2 policy into the embedded engine, against the converted checkpoint.

Under torchrun (2 gloo processes, TP=2, ``sync_worker.py``) a policy built from a tiny HF directory
trains two Adam steps (lr 1e-2) through ``PolicyRuntime.run``; TP rank 0 then streams it with
``sync_weights`` into an engine that was loaded from the ORIGINAL directory, and every rank
writes a checkpoint with ``save_checkpoint``. Here the checkpoint goes through
``convert_megatron_to_hf`` and a second engine is loaded from that. Both variants: ``a`` (untied)
and ``b`` (tied embeddings: no ``lm_head.weight`` is streamed, the engine's head is its embedding).

Asserted, bit for bit (float32 on CPU, one thread in both processes, the same prompts):
* the training really moved the weights (so nothing passes by syncing nothing), and the synced
  engine's logits differ from the ones it had before the sync;
* every weight the synced engine holds equals the converted checkpoint's tensor;
* the prompt logits (text and image prompts) are equal (``torch.equal``) and the greedy
  generations identical, log-probs included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_prism.models.conversion.convert import convert_megatron_to_hf
from megatron_prism.rollout.embedded import EmbeddedEngine
from megatron_prism.rollout.embedded.weights import read_hf_tensors
from tests.rollout.sync_worker import STEPS, probe

WORKER = Path(__file__).resolve().parent / "sync_worker.py"
REPO = Path(__file__).resolve().parents[2]
VARIANTS = "ab"


@pytest.fixture(scope="module")
def synced(tiny_dirs, tmp_path_factory) -> Path:
    """One torchrun of the worker over both variants; the output root."""
    out = tmp_path_factory.mktemp("sync_tp2")
    hf_args = [arg for v in VARIANTS for arg in ("--hf", str(tiny_dirs[v]))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), *hf_args, "--out", str(out), "--tp", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"sync worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def converted(synced, tiny_dirs, tmp_path_factory) -> dict[str, dict]:
    """Per variant: the worker's record, the converted HF directory, and the probe of an engine
    loaded from it (one thread, as in the worker, so the reductions run in the same order)."""
    root = tmp_path_factory.mktemp("sync_tp2_hf")
    threads = torch.get_num_threads()
    done = {}
    try:
        for v in VARIANTS:
            vdir = synced / tiny_dirs[v].name
            record = torch.load(vdir / "engine.pt", weights_only=True)
            hf_out = convert_megatron_to_hf(record["checkpoint"], root / v)
            engine = EmbeddedEngine(hf_out, num_threads=1)
            done[v] = {"record": record, "hf": hf_out, "probe": probe(engine),
                       "engine_weights": load_file(vdir / "engine_weights.safetensors")}
    finally:
        torch.set_num_threads(threads)
    return done


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_moved_the_weights(variant, converted, tiny_dirs):
    c = converted[variant]
    record = c["record"]
    assert record["updated"] == [True] * STEPS and record["version"] == STEPS
    assert all(torch.isfinite(torch.tensor(record["losses"])))
    original, trained = read_hf_tensors(tiny_dirs[variant]), read_hf_tensors(c["hf"])
    assert set(trained) == set(original)
    assert ("lm_head.weight" in trained) == (variant == "a")
    changed = [n for n in original if not torch.equal(original[n], trained[n])]
    # every text weight gets a gradient from the NLL, every vision weight from the image batch
    assert sorted(changed) == sorted(original), sorted(set(original) - set(changed))
    assert not torch.equal(record["logits"], record["logits_before"])
    assert (record["logits"] - record["logits_before"]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_synced_weights_equal_converted_checkpoint(variant, converted):
    c = converted[variant]
    trained, engine = read_hf_tensors(c["hf"]), c["engine_weights"]
    # the tied "b" engine has no lm_head of its own: its head is embed_tokens
    assert set(engine) == set(trained)
    assert c["record"]["stats"]["tensors"] == len(trained)
    for name, ref in trained.items():
        got = engine[name]
        if got.shape != ref.shape:  # q_norm / k_norm are stored repeated over their heads
            assert name.endswith(("q_norm.weight", "k_norm.weight")), name
            ref = ref.expand_as(got)
        assert got.dtype == ref.dtype and torch.equal(got, ref), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_bit_exact_and_greedy_identical(variant, converted):
    c = converted[variant]
    synced, reference = c["record"], c["probe"]
    assert synced["logits"].dtype == torch.float32 and synced["logits"].shape == reference["logits"].shape
    assert torch.equal(synced["logits"], reference["logits"]), \
        f"max |diff| {(synced['logits'] - reference['logits']).abs().max()}"
    assert synced["greedy"] == reference["greedy"]
    assert torch.equal(synced["greedy_logprobs"], reference["greedy_logprobs"])
    # the generations are not degenerate (a constant token would hide little)
    assert all(len(set(g)) > 1 for g in synced["greedy"]) or len({tuple(g) for g in synced["greedy"]}) > 1
