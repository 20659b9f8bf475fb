"""Transformer Engine on a CPU: ``model.attention_backend`` wiring, the TE spec's parameter names
in the one conversion map, and packed rows as THD.

What runs here: megatron-core's real TE layer spec (walked, never instantiated: see te_layout.py)
for the names; conversion, loading, checkpoint shards and weight export of a TE-named model built
from torch modules in TE's layout; the THD path of megatron's attention (its THD rotary with the
per-sample MRoPE positions) against the dense-mask path. What is owed to a GPU: TE's own kernels
(``test_te_spec_matches_transformers`` below, marked gpu).
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from cases import demonstration, hf_logits, make_case, relative_error
from te_layout import (
    megatron_te_layer_spec_available,
    model_parameter_names,
    spec_parameter_names,
    torch_te_layout_spec,
)

from megatron_prism.models import build_policy
from megatron_prism.models.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf, layout_maps
from megatron_prism.models.conversion.hf_io import HFWeights
from megatron_prism.models.conversion.mapping import canonical_name, spec_name
from megatron_prism.models.qwen3vl import spec as qspec
from megatron_prism.models.qwen3vl.config import read_hf_config
from megatron_prism.models.qwen3vl.model import attention_inputs, thd_packed_seq_params
from megatron_prism.models.qwen3vl.tiny import TOKENS


def _lm(names) -> set[str]:
    """Language-model parameter names (``_extra_state`` entries, FP8 metadata, are no parameters)."""
    return {n for n in names if n.startswith("language_model.") and not n.endswith("_extra_state")}


# ---- names --------------------------------------------------------------------------------------


def test_walked_local_spec_names_are_the_built_models(tiny_dirs):
    """The walker reads a layer spec right: on the local spec it gives the built model's names."""
    cfg = read_hf_config(tiny_dirs["a"])
    model = build_policy(tiny_dirs["a"], backend="sdpa")
    walked = model_parameter_names(cfg, spec_parameter_names(qspec.qwen3vl_layer_spec("local")))
    assert walked == _lm(model.state_dict())


def test_te_spec_names_map_to_hf_and_back(tiny_dirs):
    cfg = read_hf_config(tiny_dirs["a"])
    with megatron_te_layer_spec_available():
        layer = qspec.qwen3vl_layer_spec("te")
    assert layer.module is qspec.DeepStackTransformerLayer
    te_layer = spec_parameter_names(layer)
    assert sorted(te_layer) == sorted([
        "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight", "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
    ])  # no input_layernorm / pre_mlp_layernorm: TE fused them
    te_names = model_parameter_names(cfg, te_layer)
    map_names = _lm(m.megatron for m in layout_maps(cfg, 1))
    assert {canonical_name(n) for n in te_names} == map_names  # every TE name is a map entry (-> HF) ...
    assert {spec_name(n, "te") for n in map_names} == te_names  # ... and every map entry has its TE name
    assert all(canonical_name(spec_name(n, "te")) == n for n in map_names)
    assert spec_name("vision.model.blocks.0.norm1.weight", "te") == "vision.model.blocks.0.norm1.weight"


def test_te_moe_layer_keeps_its_pre_mlp_norm(tiny_dirs):
    """The discriminator's MoE layers under the TE spec: only the attention norm is fused."""
    from megatron_prism.models.discriminator.mapping import discriminator_maps
    from megatron_prism.models.discriminator.spec import DiscriminatorSpec

    with megatron_te_layer_spec_available():
        layer = qspec.qwen3vl_layer_spec("te", num_experts=4)
    from megatron.core.extensions.transformer_engine import TENorm

    assert layer.submodules.pre_mlp_layernorm is TENorm
    # the MoE's experts are built at run time (SequentialMLP.local_experts): compare outside the MLP
    layer.submodules.mlp = None  # (a spec built for this test only)
    te_attention = set(spec_parameter_names(layer))
    assert te_attention == {"self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
                            "self_attention.linear_proj.weight", "self_attention.q_layernorm.weight",
                            "self_attention.k_layernorm.weight", "pre_mlp_layernorm.weight"}
    cfg = read_hf_config(tiny_dirs["a"])
    names = [m.megatron for m in discriminator_maps(cfg, DiscriminatorSpec())]
    layer0 = "language_model.decoder.layers.0."
    translated = {spec_name(n, "te", moe=True)[len(layer0):] for n in names
                  if n.startswith(layer0) and ".mlp." not in n}
    assert translated == te_attention
    assert all(canonical_name(spec_name(n, "te", moe=True)) == n for n in names)


# ---- conversion: a TE-layout checkpoint, HF -> megatron(te) -> HF -> megatron(local), bit-exact ----


def test_te_layout_checkpoint_round_trip_is_bit_exact(tiny_dirs, tmp_path):
    hf = HFWeights(tiny_dirs["a"])
    te_ckpt = convert_hf_to_megatron(tiny_dirs["a"], tmp_path / "te", tp=2, layer_spec="te")
    manifest = json.loads((te_ckpt / "prism_checkpoint.json").read_text())
    stored = set(manifest["weight_map"])
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in stored
    assert "language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in stored
    assert not any(n.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for n in stored)
    back = HFWeights(convert_megatron_to_hf(te_ckpt, tmp_path / "hf"))
    assert set(back.names()) == set(hf.names())
    for name in hf.names():
        assert torch.equal(back.get(name), hf.get(name)), name
    local = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "local", tp=2)
    from safetensors.torch import load_file

    for file in manifest["files"]:
        te_tensors, local_tensors = load_file(te_ckpt / file), load_file(local / file)
        assert {canonical_name(n) for n in te_tensors} == set(local_tensors)
        for n, t in te_tensors.items():
            assert torch.equal(t, local_tensors[canonical_name(n)]), n


# ---- a TE-named model (torch modules in TE's layout) through build_policy's TE path ----------


@pytest.fixture()
def te_named_build(monkeypatch):
    """build_policy(backend="te") on a CPU: TE reported available, the TE spec replaced by its
    torch double (same names), the final TENorm by RMSNorm (both register "weight")."""
    import megatron_prism.models.qwen3vl.model as model_module

    monkeypatch.setattr(qspec, "transformer_engine_status", lambda: None)
    local_spec, local_norm = model_module.qwen3vl_layer_spec, model_module.final_norm_spec
    monkeypatch.setattr(model_module, "qwen3vl_layer_spec",
                        lambda backend="local", **kw: torch_te_layout_spec() if backend == "te" else local_spec(backend))
    monkeypatch.setattr(model_module, "final_norm_spec", lambda backend="local": local_norm("local"))
    return build_policy


def test_checkpoints_move_between_layer_specs(te_named_build, tiny_dirs, hf_models, tmp_path):
    from megatron.core.transformer.enums import AttnBackend

    from megatron_prism.rollout.weight_sync import export_hf_weights
    from megatron_prism.training.checkpoint import _model_shard

    cfg = read_hf_config(tiny_dirs["a"])
    with megatron_te_layer_spec_available():
        te_layer = spec_parameter_names(qspec.qwen3vl_layer_spec("te"))
    local_model = te_named_build(tiny_dirs["a"], backend="sdpa").eval()
    te_model = te_named_build(tiny_dirs["a"], backend="te").eval()  # from the HF directory
    assert te_model.config.attention_backend == AttnBackend.auto and te_model.packed_layout == "thd"
    assert local_model.config.attention_backend == AttnBackend.local and local_model.packed_layout == "mask"
    assert _lm(te_model.state_dict()) == model_parameter_names(cfg, te_layer)  # the double has TE's names
    case = make_case([[[1, 4, 4]], [[1, 2, 6]]], seed=4, pad_side="right")
    kwargs = {k: case.get(k) for k in ("pixel_values", "image_grid_thw", "attention_mask")}
    with torch.no_grad():
        local_logits = local_model(case["input_ids"], **kwargs)
        te_logits = te_model(case["input_ids"], **kwargs)
    keep = case["attention_mask"].bool()
    assert torch.equal(te_logits[keep], local_logits[keep])  # same maths, under the other names
    assert relative_error(te_logits, hf_logits(hf_models["a"], case), case) <= 1e-4

    # a local-layout checkpoint into the TE-named model, and a TE-layout one into the local model
    local_ckpt = convert_hf_to_megatron(tiny_dirs["a"], tmp_path / "local")
    te_ckpt = convert_hf_to_megatron(tiny_dirs["a"], tmp_path / "te", layer_spec="te")
    for built in (te_named_build(local_ckpt, backend="te"), te_named_build(te_ckpt, backend="sdpa")):
        with torch.no_grad():
            assert torch.equal(built.eval()(case["input_ids"], **kwargs)[keep], local_logits[keep])

    # saving and weight sync speak the map's names whatever the spec, with the same tensors
    te_shard, local_shard = _model_shard([te_model], cfg), _model_shard([local_model], cfg)
    assert te_shard.keys() == local_shard.keys()
    assert all(torch.equal(te_shard[k], local_shard[k]) for k in te_shard)
    hf = HFWeights(tiny_dirs["a"])
    exported = dict(export_hf_weights(te_model, cfg))
    assert set(exported) == set(hf.names()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert all(torch.equal(t, hf.get(n)) for n, t in exported.items())


# ---- packed rows: THD under TE, the dense mask under the local spec -----------------------------


def _packed_row():
    from megatron_prism.data.packing import VisionTokens, pack_demonstrations

    vision = VisionTokens(TOKENS["image_token_id"], TOKENS["video_token_id"], spatial_merge_size=2)
    gen = torch.Generator().manual_seed(3)
    examples = [demonstration(gen, "s0", [[1, 4, 4]], 5, 9), demonstration(gen, "s1", [], 7, 6),
                demonstration(gen, "s2", [[1, 2, 6], [1, 4, 2]], 3, 11)]
    return pack_demonstrations(examples, max_length=64, vision=vision, pad_id=0, pad_to_multiple_of=16)[0]


def test_mask_choice_for_a_packed_row():
    row = _packed_row()
    length = row.input_ids.shape[1]
    ends = [e for _, e in row.spans]
    assert ends[-1] < length  # the row has trailing padding
    # local spec: the dense block-diagonal mask, unchanged, no THD
    mask, packed = attention_inputs("mask", row.attention_mask, (1, length), row.cu_seqlens)
    assert packed is None and mask is row.attention_mask
    # TE spec: THD with the packing's boundaries (+ the padding as its own sequence), no dense mask
    mask, packed = attention_inputs("thd", row.attention_mask, (1, length), row.cu_seqlens)
    assert mask is None and packed.qkv_format == "thd"
    assert packed.cu_seqlens_q.tolist() == [0, *ends, length] == packed.cu_seqlens_kv.tolist()
    assert packed.cu_seqlens_q.dtype == torch.int32
    assert packed.max_seqlen_q == packed.max_seqlen_kv == max(b - a for a, b in zip([0, *ends], [*ends, length]))
    assert thd_packed_seq_params(torch.tensor([0, 5, 8]), 8).cu_seqlens_q.tolist() == [0, 5, 8]  # no padding
    with pytest.raises(ValueError, match="cu_seqlens"):  # a dense mask alone would be ignored by TE
        attention_inputs("thd", row.attention_mask, (1, length))
    with pytest.raises(ValueError, match="one packed row"):
        attention_inputs("thd", None, (2, length), row.cu_seqlens)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert attention_inputs("thd", right, (2, 4)) == (None, None)  # causal alone is exact for right padding
    with pytest.raises(ValueError, match="right-padded"):
        attention_inputs("thd", right.flip(1), (2, 4))
    with pytest.raises(ValueError, match="rise from 0"):
        thd_packed_seq_params(torch.tensor([0, 9, 5]), 16)


def test_thd_row_matches_the_dense_mask_row(te_named_build, tiny_dirs):
    """The THD path (megatron's THD rotary with per-sample MRoPE positions, squeezed attention
    shapes, SDPA's THD reference in place of TE's kernel) gives the dense-mask path's log-probs."""
    from megatron_prism.models.qwen3vl.model import HeadRequest

    row = _packed_row()
    local_model = te_named_build(tiny_dirs["a"], backend="sdpa").eval()
    te_model = te_named_build(tiny_dirs["a"], backend="te").eval()
    common = dict(pixel_values=row.pixel_values, image_grid_thw=row.image_grid_thw, position_ids=row.position_ids)
    with torch.no_grad():
        dense = local_model(row.input_ids, head=HeadRequest(row.targets, backend="reference"),
                            attention_mask=row.attention_mask, **common).logp
        thd = te_model(row.input_ids, head=HeadRequest(row.targets, backend="reference"),
                       cu_seqlens=row.cu_seqlens, **common).logp
    real = slice(0, row.spans[-1][1])
    torch.testing.assert_close(thd[:, real], dense[:, real], rtol=1e-6, atol=1e-6)
    # control: one THD sequence over the whole row (no boundaries) lets later samples see earlier ones
    with torch.no_grad():
        leaky = te_model(row.input_ids, head=HeadRequest(row.targets, backend="reference"),
                         cu_seqlens=torch.tensor([0, row.input_ids.shape[1]]), **common).logp
    later = slice(*row.spans[1])
    assert not torch.allclose(leaky[:, later], dense[:, later], atol=1e-4)


# ---- model.attention_backend ---------------------------------------------------------------------


def test_attention_backend_choice(monkeypatch):
    from megatron.core.transformer.enums import AttnBackend

    monkeypatch.setattr(qspec, "transformer_engine_status", lambda: "transformer_engine does not import (x)")
    auto = qspec.resolve_attention_backend("auto")
    assert (auto.resolved, auto.layer_spec, auto.attn_backend) == ("sdpa", "local", AttnBackend.local)
    assert qspec.resolve_attention_backend("local").resolved == "sdpa"
    for name in ("te", "flash", "fused", "unfused"):
        with pytest.raises(ValueError, match=rf"^model.attention_backend='{name}' needs Transformer Engine, but "
                                             r"transformer_engine does not import \(x\); .* set model.attention_backend "
                                             r"to sdpa \(or auto\)$"):
            qspec.resolve_attention_backend(name)
    with pytest.raises(ValueError, match="model.attention_backend='xformers' is not one of auto, sdpa, te"):
        qspec.resolve_attention_backend("xformers")
    monkeypatch.setattr(qspec, "transformer_engine_status", lambda: None)
    assert qspec.resolve_attention_backend("auto").layer_spec == "te"
    for name, enum in (("te", AttnBackend.auto), ("flash", AttnBackend.flash), ("fused", AttnBackend.fused),
                       ("unfused", AttnBackend.unfused)):
        choice = qspec.resolve_attention_backend(name)
        assert (choice.layer_spec, choice.attn_backend) == ("te", enum)


@pytest.fixture
def without_te(monkeypatch):
    """Transformer Engine unusable: as it is on this CPU, or made so where it runs (the refusal is
    checked on every machine, never skipped)."""
    if qspec.transformer_engine_status() is None:
        monkeypatch.setattr(qspec, "transformer_engine_status", lambda: "no CUDA device is available")


def test_te_on_this_cpu_is_one_line(tiny_dirs, without_te):
    with pytest.raises(ValueError, match=r"^model.attention_backend='te' needs Transformer Engine, but [^\n]*$"):
        build_policy(tiny_dirs["a"], backend="te")


# ---- owed to a GPU -----------------------------------------------------------------------------


@pytest.mark.gpu  # Transformer Engine's kernels need CUDA; the CPU tests above check names and plumbing
def test_te_spec_matches_transformers(tiny_dirs, hf_models):
    """The real TE spec: fp32 logits against transformers' tiny Qwen3-VL, and a packed bf16 row
    (THD through TE's fused attention) against its samples run one by one."""
    pytest.importorskip("transformer_engine.pytorch", reason="the [te] extra is not installed")
    from megatron_prism.models.qwen3vl.model import HeadRequest

    model = build_policy(tiny_dirs["a"], backend="te").eval()
    assert model.packed_layout == "thd"
    for seed, grids in ((1, [[[1, 4, 4]]]), (2, [[[1, 4, 4], [1, 6, 2]], []])):
        case = {k: v.cuda() for k, v in make_case(grids, seed, pad_side="right").items()}
        with torch.no_grad():
            out = model(case["input_ids"], pixel_values=case.get("pixel_values"),
                        image_grid_thw=case.get("image_grid_thw"), attention_mask=case.get("attention_mask"))
        cpu = {k: v.cpu() for k, v in case.items()}
        # 2e-3, not the CPU parity's 1e-4: TE picks its own GEMM compute type for fp32 inputs (TF32
        # tensor cores are possible; not checked without a GPU) and its unfused fp32 attention
        assert relative_error(out.float().cpu(), hf_logits(hf_models["a"], cpu), cpu) <= 2e-3
    bf16 = build_policy(tiny_dirs["a"], backend="te", dtype=torch.bfloat16).eval()
    row = _packed_row()
    kw = dict(pixel_values=row.pixel_values.cuda().bfloat16(), image_grid_thw=row.image_grid_thw.cuda(),
              position_ids=row.position_ids.cuda(), cu_seqlens=row.cu_seqlens.cuda())
    dense_ref = build_policy(tiny_dirs["a"], backend="sdpa", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        thd = bf16(row.input_ids.cuda(), head=HeadRequest(row.targets.cuda()), **kw).logp.float()
        dense = dense_ref(row.input_ids.cuda(), head=HeadRequest(row.targets.cuda()),
                          attention_mask=row.attention_mask.cuda(), **{k: v for k, v in kw.items() if k != "cu_seqlens"}
                          ).logp.float()
    real = row.targets[0, : row.spans[-1][1]] != -100
    torch.testing.assert_close(thd[0, : row.spans[-1][1]][real.cuda()], dense[0, : row.spans[-1][1]][real.cuda()],
                               rtol=0.05, atol=0.05)


def test_sft_rows_reach_the_model_as_thd(te_named_build, tiny_dirs):
    """SFT's packing -> micro-batches -> the runtime's forward step: under the TE spec the rows carry
    cu_seqlens and no [L, L] mask, and give the local spec's dense-mask log-probs."""
    from megatron_prism.config.schema import ModelConfig, ParallelConfig
    from megatron_prism.data.packing import VisionTokens, pack_demonstrations
    from megatron_prism.stages.sft import _rows_to_micro_batches
    from megatron_prism.training.runtime import PolicyRuntime

    vision = VisionTokens(TOKENS["image_token_id"], TOKENS["video_token_id"], spatial_merge_size=2)
    gen = torch.Generator().manual_seed(5)
    examples = [demonstration(gen, f"s{i}", grids, 4, 6 + i) for i, grids in enumerate([[[1, 4, 4]], [], [[1, 2, 6]], []])]
    logp = {}
    for backend in ("sdpa", "te"):
        runtime = PolicyRuntime.build(tiny_dirs["a"], ModelConfig(attention_backend=backend), ParallelConfig(), None,
                                      total_steps=1, seed=1, trainable=False)
        rows = pack_demonstrations(examples, 48, vision, pad_id=0, pad_to_multiple_of=16,
                                   dense_mask=runtime.packed_layout == "mask")
        assert all((r.attention_mask is None) == (backend == "te") for r in rows)
        mbs = _rows_to_micro_batches(rows)
        got: dict[int, torch.Tensor] = {}
        runtime.run(mbs, lambda out, t: (out.logp.sum() * 0, {}), forward_only=True,
                    collect=lambda i, out: got.__setitem__(i, out.logp.detach()))
        logp[backend] = [(got[i], r) for i, r in enumerate(rows)]
    assert len(logp["te"]) == len(logp["sdpa"]) >= 2
    for (te, row), (dense, _) in zip(logp["te"], logp["sdpa"]):
        real = slice(0, row.spans[-1][1])
        torch.testing.assert_close(te[:, real], dense[:, real], rtol=1e-6, atol=1e-6)


def test_megatron_thd_rotary_needs_the_padding_sequence():
    """Why thd_packed_seq_params counts the padding as a sequence: megatron 0.16.1 applies per-token
    (MRoPE) angles under THD only when cu_seqlens ends at the row length; otherwise it restarts
    angles 0..n at each sample, which is wrong for 3-D positions."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd, _apply_rotary_pos_emb_thd

    from megatron_prism.models.qwen3vl.rope import InterleavedMRoPE

    gen = torch.Generator().manual_seed(0)
    t, heads, dim = 12, 2, 8
    x = torch.randn(t, heads, dim, generator=gen)
    positions = torch.tensor([0, 1, 1, 1, 2, 3, 0, 1, 2, 0, 0, 0]).expand(3, 1, t).clone()
    positions[1, 0, 1:4] = torch.tensor([1, 2, 2])  # an image's rows differ from its text position
    freqs = InterleavedMRoPE(dim, 10000.0, [2, 1, 1])(positions)  # [t, 1, 1, dim]
    per_token = _apply_rotary_pos_emb_bshd(x[:, None], freqs).squeeze(1)
    cp = types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)  # no context parallelism (all it asks)
    cu = thd_packed_seq_params(torch.tensor([0, 6, 9]), t).cu_seqlens_q  # padding tail [9, 12) appended
    assert torch.equal(_apply_rotary_pos_emb_thd(x, cu, freqs, cp_group=cp), per_token)
    short = torch.tensor([0, 6, 9], dtype=torch.int32)
    assert not torch.allclose(_apply_rotary_pos_emb_thd(x[:9], short, freqs, cp_group=cp), per_token[:9])


def test_te_backend_on_this_cpu_is_refused_before_the_run(without_te):
    """The config check (prism run validates first) says it in one line, before any stage starts."""
    from pathlib import Path

    from megatron_prism.config import ConfigError, load_config
    from megatron_prism.config.validate import check_config

    tiny = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny.yaml"
    for name in ("te", "flash"):
        cfg = load_config(tiny, [f"model.attention_backend={name}"])
        with pytest.raises(ConfigError, match=rf"^key 'model.attention_backend' .* is '{name}': needs Transformer "
                                              r"Engine, but [^\n]*use sdpa \(or auto\)$"):
            check_config(cfg, overrides=[f"model.attention_backend={name}"])
    check_config(load_config(tiny, ["model.attention_backend=auto"]))
