"""The one Hugging Face <-> Megatron map for Qwen3-VL: names, shapes, tensor-parallel splits.

Megatron names here are *global*: ``language_model.decoder.layers.{i}`` uses the model's layer
index, not the index inside a pipeline stage (see :func:`stage_of` / :func:`local_name`). Each
:class:`ParamMap` turns the HF tensors of one megatron parameter into the shard a TP rank holds
(:meth:`ParamMap.shard`) and all ranks' shards back into the HF tensors (:meth:`ParamMap.unshard`).
Both are pure slicing and concatenation, so HF -> Megatron -> HF is bit-exact.

Split kinds:
* ``replicated``: every TP rank holds the whole tensor (norms, the vision tower);
* ``rows`` / ``cols``: split along dim 0 (column-parallel output, vocab) / dim 1 (row-parallel);
* ``qkv``: megatron packs q, k, v per query group ``[g0: q.. k v | g1: q.. k v | ...]`` and splits
  the groups across ranks;
* ``gate_up``: megatron packs SwiGLU's gate and up projections, each split across ranks, as
  ``[gate_r; up_r]`` on rank r.

Vocabulary padding, as megatron does it: the embedding and output layer hold
:func:`padded_vocab_size` rows (a multiple of ``VOCAB_DIVISIBLE_BY`` x TP), so any TP divides them.
``shard`` appends zero rows after the real vocabulary and ``unshard`` drops them again, so the
padding never leaves the megatron side (HF files and engine weight syncs have the real vocabulary)
and a checkpoint reshards to another TP through the real rows.

Layer specs: the names here are the local spec's, and every checkpoint this project writes uses
them. Transformer Engine's spec holds two of the tensors under other names (it fuses each pre-norm
into the linear after it); :func:`spec_name` and :func:`canonical_name` are the one translation,
applied where a model's own parameter names meet the map (loading, :func:`global_name` for saving
and weight export) and where a checkpoint's stored names are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LM = "model.language_model"
VISION_HF = "model.visual."
VISION_MEGATRON = "vision.model."
# megatron's --make-vocab-size-divisible-by default: the padded vocabulary is a multiple of this x TP
VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """The rows megatron's embedding / output layer hold for ``vocab`` real tokens at TP ``tp``."""
    if vocab < 1 or tp < 1 or divisible_by < 1:
        raise ValueError(f"vocab, tp and divisible_by must be >= 1, got {vocab}, {tp}, {divisible_by}")
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


@dataclass(frozen=True)
class ParamMap:
    """One megatron parameter and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    split: str  # replicated | rows | cols | qkv | gate_up
    layer: int | None = None  # global LM layer index, None for non-layer params
    place: str = "layer"  # layer | first | last (pipeline stage that owns it)
    heads_per_group: int = 1
    head_dim: int = 1
    vocab: int = 0  # real rows of a vocabulary-parallel ("rows") parameter, padded on the megatron side

    def shard(self, hf_tensors: list[torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
        """The slice of this parameter that TP rank ``tp_rank`` of ``tp_size`` holds."""
        if self.split == "replicated":
            return hf_tensors[0]
        if self.split == "rows" and self.vocab:
            full = hf_tensors[0]
            if full.shape[0] != self.vocab:
                raise ValueError(f"{self.megatron}: {full.shape[0]} rows, the vocabulary has {self.vocab}")
            pad = padded_vocab_size(self.vocab, tp_size) - self.vocab
            if pad:
                full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
            return full.chunk(tp_size, dim=0)[tp_rank]
        if self.split == "rows":
            return hf_tensors[0].chunk(tp_size, dim=0)[tp_rank]
        if self.split == "cols":
            return hf_tensors[0].chunk(tp_size, dim=1)[tp_rank]
        if self.split == "gate_up":
            gate, up = hf_tensors
            return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
        if self.split == "qkv":
            q, k, v = hf_tensors
            groups = k.shape[0] // self.head_dim
            per = self.heads_per_group * self.head_dim
            packed = torch.cat(
                [
                    q.reshape(groups, per, *q.shape[1:]),
                    k.reshape(groups, self.head_dim, *k.shape[1:]),
                    v.reshape(groups, self.head_dim, *v.shape[1:]),
                ],
                dim=1,
            )
            mine = packed.chunk(tp_size, dim=0)[tp_rank]
            return mine.reshape(-1, *q.shape[1:])
        raise ValueError(f"unknown split kind {self.split!r}")

    def unshard(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """All TP ranks' shards (in rank order) -> the HF tensors, in ``self.hf`` order."""
        if self.split == "replicated":
            return [shards[0]]
        if self.split == "rows" and self.vocab:
            return [torch.cat(shards, dim=0)[: self.vocab]]
        if self.split == "rows":
            return [torch.cat(shards, dim=0)]
        if self.split == "cols":
            return [torch.cat(shards, dim=1)]
        if self.split == "gate_up":
            halves = [s.chunk(2, dim=0) for s in shards]
            return [torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0)]
        if self.split == "qkv":
            per = (self.heads_per_group + 2) * self.head_dim
            packed = torch.cat([s.reshape(-1, per, *s.shape[1:]) for s in shards], dim=0)
            q_rows = self.heads_per_group * self.head_dim
            q = packed[:, :q_rows].reshape(-1, *packed.shape[2:])
            k = packed[:, q_rows : q_rows + self.head_dim].reshape(-1, *packed.shape[2:])
            v = packed[:, q_rows + self.head_dim :].reshape(-1, *packed.shape[2:])
            return [q.contiguous(), k.contiguous(), v.contiguous()]
        raise ValueError(f"unknown split kind {self.split!r}")


def language_model_maps(hf_config) -> list[ParamMap]:
    """Every language-model parameter of a Qwen3-VL config, in a fixed order."""
    tc = hf_config.text_config
    hpg = tc.num_attention_heads // tc.num_key_value_heads
    hd = tc.head_dim
    maps = [
        ParamMap("language_model.embedding.word_embeddings.weight", (f"{LM}.embed_tokens.weight",), "rows",
                 place="first", vocab=tc.vocab_size),
    ]
    for i in range(tc.num_hidden_layers):
        hf = f"{LM}.layers.{i}"
        mg = f"language_model.decoder.layers.{i}"
        maps += [
            ParamMap(f"{mg}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",), "replicated", i),
            ParamMap(
                f"{mg}.self_attention.linear_qkv.weight",
                (f"{hf}.self_attn.q_proj.weight", f"{hf}.self_attn.k_proj.weight", f"{hf}.self_attn.v_proj.weight"),
                "qkv", i, heads_per_group=hpg, head_dim=hd,
            ),
        ]
        if tc.attention_bias:
            maps.append(ParamMap(
                f"{mg}.self_attention.linear_qkv.bias",
                (f"{hf}.self_attn.q_proj.bias", f"{hf}.self_attn.k_proj.bias", f"{hf}.self_attn.v_proj.bias"),
                "qkv", i, heads_per_group=hpg, head_dim=hd,
            ))
        maps += [
            ParamMap(f"{mg}.self_attention.q_layernorm.weight", (f"{hf}.self_attn.q_norm.weight",), "replicated", i),
            ParamMap(f"{mg}.self_attention.k_layernorm.weight", (f"{hf}.self_attn.k_norm.weight",), "replicated", i),
            ParamMap(f"{mg}.self_attention.linear_proj.weight", (f"{hf}.self_attn.o_proj.weight",), "cols", i),
            ParamMap(f"{mg}.pre_mlp_layernorm.weight", (f"{hf}.post_attention_layernorm.weight",), "replicated", i),
            ParamMap(
                f"{mg}.mlp.linear_fc1.weight",
                (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"),
                "gate_up", i,
            ),
            ParamMap(f"{mg}.mlp.linear_fc2.weight", (f"{hf}.mlp.down_proj.weight",), "cols", i),
        ]
    maps.append(ParamMap("language_model.decoder.final_layernorm.weight", (f"{LM}.norm.weight",), "replicated", place="last"))
    if hf_config.tie_word_embeddings:
        # With pipeline stages the last stage keeps its own copy of the tied embedding (megatron
        # keeps the two in sync); it is written from, and never written back to, embed_tokens.
        maps.append(ParamMap("language_model.output_layer.weight", (f"{LM}.embed_tokens.weight",), "rows",
                             place="last", vocab=tc.vocab_size))
    else:
        maps.append(ParamMap("language_model.output_layer.weight", ("lm_head.weight",), "rows", place="last",
                             vocab=tc.vocab_size))
    return maps


def vision_maps(hf_vision_names: list[str]) -> list[ParamMap]:
    """The vision tower keeps its HF names (replicated, first stage)."""
    return [
        ParamMap(VISION_MEGATRON + name[len(VISION_HF):], (name,), "replicated", place="first")
        for name in sorted(hf_vision_names)
    ]


def expected_vision_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of the vision tower for this config (built on the meta device)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    with torch.device("meta"):
        tower = Qwen3VLVisionModel(hf_config.vision_config)
    return {VISION_HF + k: tuple(v.shape) for k, v in tower.state_dict().items()}


def expected_lm_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of the language model for this config."""
    tc = hf_config.text_config
    h, hd, nh, nkv, ffn, vocab = (
        tc.hidden_size, tc.head_dim, tc.num_attention_heads, tc.num_key_value_heads,
        tc.intermediate_size, tc.vocab_size,
    )
    shapes: dict[str, tuple[int, ...]] = {f"{LM}.embed_tokens.weight": (vocab, h), f"{LM}.norm.weight": (h,)}
    if not hf_config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(tc.num_hidden_layers):
        p = f"{LM}.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (nh * hd, h),
            f"{p}.self_attn.k_proj.weight": (nkv * hd, h),
            f"{p}.self_attn.v_proj.weight": (nkv * hd, h),
            f"{p}.self_attn.o_proj.weight": (h, nh * hd),
            f"{p}.self_attn.q_norm.weight": (hd,),
            f"{p}.self_attn.k_norm.weight": (hd,),
            f"{p}.mlp.gate_proj.weight": (ffn, h),
            f"{p}.mlp.up_proj.weight": (ffn, h),
            f"{p}.mlp.down_proj.weight": (h, ffn),
        })
        if tc.attention_bias:
            shapes.update({
                f"{p}.self_attn.q_proj.bias": (nh * hd,),
                f"{p}.self_attn.k_proj.bias": (nkv * hd,),
                f"{p}.self_attn.v_proj.bias": (nkv * hd,),
            })
    return shapes


def all_maps(hf_config, hf_vision_names: list[str]) -> list[ParamMap]:
    """Language model + vision tower maps."""
    return language_model_maps(hf_config) + vision_maps(hf_vision_names)


# ---- layer-spec names ---------------------------------------------------------------------------

_DECODER = "language_model.decoder.layers."
# (the map's / local spec's suffix, the TE spec's suffix). TE's LayerNormLinear registers the fused
# norm's scale as ``layer_norm_weight`` (TE 2.11 pytorch/module/layernorm_linear.py:1259-1265; an
# RMSNorm registers no ``layer_norm_bias``, :1267-1275), and megatron-core 0.16.1's TE spec puts
# one in linear_qkv and, for a dense MLP, one in linear_fc1 (models/gpt/gpt_layer_specs.py,
# get_gpt_layer_with_transformer_engine_spec), leaving input_layernorm / pre_mlp_layernorm IdentityOp.
_FUSED_NORMS = (
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
)


def spec_name(name: str, spec: str, *, moe: bool = False) -> str:
    """The map's name of a parameter -> its name in a model built with layer spec ``spec``
    (``local`` | ``te``). An MoE layer keeps its ``pre_mlp_layernorm`` under TE too (the norm sits
    before the router, outside any linear: the TE spec's pre_mlp_layernorm is a TENorm there)."""
    if spec == "local" or not name.startswith(_DECODER):
        return name
    if spec != "te":
        raise ValueError(f"unknown layer spec {spec!r}: expected 'local' or 'te'")
    for local, te in _FUSED_NORMS[:1] if moe else _FUSED_NORMS:
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def canonical_name(name: str) -> str:
    """A parameter name of either layer spec (chunk-local or global) -> the map's name."""
    if name.startswith(_DECODER):
        for local, te in _FUSED_NORMS:
            if name.endswith(te):
                return name[: -len(te)] + local
    return name


# ---- pipeline placement -------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which pipeline rank / virtual stage owns a parameter, and its name there."""

    pp_rank: int
    vp_stage: int
    local_name: str


def layers_per_chunk(num_layers: int, pp: int, vpp: int | None) -> int:
    return num_layers // (pp * (vpp or 1))


def place(param: ParamMap, num_layers: int, pp: int, vpp: int | None = None) -> Placement:
    """Where ``param`` lives under a (pp, vpp) layout; layer indices become chunk-local.

    Megatron's interleaved schedule gives virtual stage v of rank r the layers of model chunk
    ``v * pp + r``; without virtual stages that is simply stage r.
    """
    chunks = vpp or 1
    if param.place == "first":
        return Placement(0, 0, param.megatron)
    if param.place == "last":
        return Placement(pp - 1, chunks - 1, param.megatron)
    per = layers_per_chunk(num_layers, pp, vpp)
    chunk, local = divmod(param.layer, per)
    prefix = "language_model.decoder.layers."
    rest = param.megatron[len(prefix):].split(".", 1)[1]
    return Placement(chunk % pp, chunk // pp, f"{prefix}{local}.{rest}")


def global_name(local_name: str, pp_rank: int, vp_stage: int, num_layers: int, pp: int, vpp: int | None = None) -> str:
    """Inverse of :func:`place`: a chunk-local parameter name (of either layer spec) -> its global
    name in the map."""
    prefix = _DECODER
    local_name = canonical_name(local_name)
    if not local_name.startswith(prefix):
        return local_name
    local, rest = local_name[len(prefix):].split(".", 1)
    chunk = vp_stage * pp + pp_rank
    return f"{prefix}{chunk * layers_per_chunk(num_layers, pp, vpp) + int(local)}.{rest}"
