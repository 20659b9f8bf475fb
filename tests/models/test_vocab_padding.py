"""Vocabulary padding as megatron does it: a Qwen3-VL whose vocabulary TP does not divide (397 at
TP=2) builds with a padded embedding / output layer, converts bit-exact both ways, matches
transformers' logits and log-probs at TP=2, and its padding never leaves the megatron side."""

from __future__ import annotations

import json

import pytest
import torch
from cases import assert_logp_entropy_match, hf_logits, relative_error, run_worker, standard_cases
from safetensors.torch import load_file

from megatron_prism.models.conversion import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_prism.models.conversion.mapping import language_model_maps, padded_vocab_size
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.models.qwen3vl.tiny import save_random_qwen3vl

VOCAB = 397
EMBED = "language_model.embedding.word_embeddings.weight"
OUTPUT = "language_model.output_layer.weight"


@pytest.fixture(scope="module")
def odd_vocab_dir(tmp_path_factory):
    return save_random_qwen3vl(tmp_path_factory.mktemp("vocab397") / "c", "c", seed=5)


@pytest.fixture(scope="module")
def odd_vocab_hf(odd_vocab_dir):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(odd_vocab_dir, dtype=torch.float32).eval()


def _all(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("vocab,tp,want", [(397, 1, 512), (397, 2, 512), (397, 4, 512), (151936, 1, 151936),
                                           (151936, 2, 152064), (256, 2, 256), (257, 2, 512), (1, 8, 1024)])
def test_padded_vocab_size_is_megatrons_rule(vocab, tp, want):
    # megatron's _vocab_size_with_padding: round up to a multiple of make_vocab_size_divisible_by x TP (128 x TP)
    assert padded_vocab_size(vocab, tp) == want
    with pytest.raises(ValueError, match="must be >= 1"):
        padded_vocab_size(vocab, 0)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])  # (the 2 KV heads bound TP at 2)
def test_round_trip_through_padded_shards_is_bit_exact(odd_vocab_dir, tmp_path, tp, pp):
    mg = convert_hf_to_megatron(odd_vocab_dir, tmp_path / "mg", tp=tp, pp=pp)
    rows = padded_vocab_size(VOCAB, tp) // tp
    original = _all(odd_vocab_dir)
    embed = original["model.language_model.embed_tokens.weight"]
    for t in range(tp):
        shard = load_file(mg / f"mp_rank_{t:02d}_000.safetensors")[EMBED]
        assert shard.shape == (rows, embed.shape[1])
        real = embed[t * rows: (t + 1) * rows]
        assert torch.equal(shard[: real.shape[0]], real)
        assert torch.count_nonzero(shard[real.shape[0]:]) == 0  # padding rows are zeros
    last = load_file(mg / f"mp_rank_{tp - 1:02d}_{pp - 1:03d}.safetensors")[OUTPUT]
    assert last.shape[0] == rows
    back = _all(convert_megatron_to_hf(mg, tmp_path / "hf"))
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name  # the padding never reaches HF files
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["vocab_size"] == VOCAB


def test_unshard_drops_the_padding_whatever_the_tp():
    cfg = read_hf_config_from_variant()
    embed = next(m for m in language_model_maps(cfg) if m.megatron == EMBED)
    full = torch.randn(VOCAB, 3, dtype=torch.float64)
    for tp in (1, 2, 3, 8):
        shards = [embed.shard([full], r, tp) for r in range(tp)]
        assert sum(s.shape[0] for s in shards) == padded_vocab_size(VOCAB, tp)
        assert torch.equal(embed.unshard(shards)[0], full)
    with pytest.raises(ValueError, match="rows, the vocabulary has 397"):
        embed.shard([full[:-1]], 0, 2)


def read_hf_config_from_variant():
    from megatron_prism.models.qwen3vl.tiny import tiny_qwen3vl_config

    return tiny_qwen3vl_config("c")


def test_tp2_logits_and_log_probs_match_transformers(odd_vocab_dir, odd_vocab_hf, tmp_path):
    """Logits come back with the real vocabulary (397, not the 512 rows held); the fused training
    head's log-probs and entropy are those of a softmax over the real vocabulary only (float64
    reference from transformers' logits)."""
    cases = standard_cases(seed=29, multiple_of=2)
    names = list(cases)
    torch.save([cases[n] for n in names], tmp_path / "inputs.pt")
    run_worker(2, "parity", odd_vocab_dir, tmp_path / "inputs.pt", tmp_path / "logits", "--tp", "2")
    got = load_file(tmp_path / "logits" / "logits.safetensors")
    for i, name in enumerate(names):
        ref = hf_logits(odd_vocab_hf, cases[name])
        assert ref.shape[-1] == VOCAB and got[f"logits_{i}"].shape == ref.shape, name
        assert relative_error(got[f"logits_{i}"], ref, cases[name]) <= 1e-4, name
    run_worker(2, "parity", odd_vocab_dir, tmp_path / "inputs.pt", tmp_path / "head", "--tp", "2", "--head", "torch")
    got = load_file(tmp_path / "head" / "logp_entropy.safetensors")
    for i, name in enumerate(names):
        assert_logp_entropy_match(got[f"logp_entropy_{i}"], odd_vocab_hf, cases[name])


def test_padding_rows_get_no_gradient_and_grads_match_tp1(odd_vocab_dir, tmp_path):
    from test_parallel import _grad_cases, _hf_grads

    torch.save(_grad_cases(), tmp_path / "inputs.pt")
    run_worker(1, "grads", odd_vocab_dir, tmp_path / "inputs.pt", tmp_path / "tp1")
    run_worker(2, "grads", odd_vocab_dir, tmp_path / "inputs.pt", tmp_path / "tp2", "--tp", "2")
    rows = padded_vocab_size(VOCAB, 2) // 2
    rank1 = load_file(tmp_path / "tp2" / "grads_tp1_pp0.safetensors")
    real_on_rank1 = VOCAB - rows
    for name in (EMBED, OUTPUT):
        assert rank1[name].shape[0] == rows
        assert torch.count_nonzero(rank1[name][real_on_rank1:]) == 0, name
    cfg = read_hf_config(odd_vocab_dir)
    ref, got = _hf_grads(tmp_path / "tp1", cfg, 1), _hf_grads(tmp_path / "tp2", cfg, 1)
    for name, g in ref.items():
        assert got[name].shape == g.shape, name
        err = (got[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err <= 1e-4, (name, float(err))
    assert losses_equal(tmp_path)


def losses_equal(tmp_path) -> bool:
    a, b = load_file(tmp_path / "tp1" / "losses.safetensors"), load_file(tmp_path / "tp2" / "losses.safetensors")
    return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
