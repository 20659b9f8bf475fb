"""The Transformer Engine layer spec's parameter names, read on a CPU, and a torch double of its layout.

Parameter names of the TE spec come from two sources, neither of which needs TE installed:

* the slots: megatron-core's own TE spec (``spec._te_layer_spec``, i.e.
  ``get_gpt_layer_with_transformer_engine_spec``), walked as a ModuleSpec tree. Without TE,
  megatron leaves ``TESpecProvider`` out of gpt_layer_specs' globals and its layer-norm choice asks
  TE's version; :func:`megatron_te_layer_spec` supplies both (the provider class itself imports on
  a CPU: megatron puts MagicMocks where TE's classes would be, each a distinct object we can
  recognise by identity);
* what each TE module registers, from Transformer Engine 2.11's released source (the ``[te]`` extra
  pins >=2.9,<2.12), written into :data:`TE_PARAMS` with the file and lines.

:func:`torch_te_layout_spec` builds the same layout from torch modules (the pre-norms inside the
linears, under TE's names), so a TE-named model can be built, loaded, saved, exported and run on a
CPU. It is a test double of the layout (names and maths), not of TE's kernels: parity with TE
itself is the GPU test's.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp

from megatron_prism.models.common.rmsnorm import RMSNorm
from megatron_prism.models.common.sdpa_attention import SDPACoreAttention

# Parameters each module of megatron's TE spec registers (TE 2.11 wheel, transformer_engine/pytorch/):
TE_PARAMS: dict[str, tuple[str, ...]] = {
    # module/layernorm_linear.py:1259-1265 registers "layer_norm_weight"; with normalization="RMSNorm"
    # no "layer_norm_bias" (:1267-1275); one "weight" without parameters_split (:1296-1302, :1358-1364),
    # which megatron's TELayerNormColumnParallelLinear never passes; "bias" only with bias=True
    # (:1366-1375; Qwen3 has none)
    "TELayerNormColumnParallelLinear": ("layer_norm_weight", "weight"),
    # module/linear.py:1207-1212 and :1269-1275: one "weight" (bias as above)
    "TEColumnParallelLinear": ("weight",),
    "TERowParallelLinear": ("weight",),
    # megatron's TENorm returns te.pytorch.RMSNorm (extensions/transformer_engine.py TENorm.__new__),
    # whose op registers "weight" (ops/basic/rmsnorm.py:101-103)
    "TENorm": ("weight",),
    # softmax_type "vanilla" registers nothing (attention/dot_product_attention/dot_product_attention.py:426-437)
    "TEDotProductAttention": (),
}
LOCAL_PARAMS = {RMSNorm: ("weight",), ColumnParallelLinear: ("weight",), RowParallelLinear: ("weight",),
                SDPACoreAttention: ()}
_SKIP = (IdentityOp, IdentityFuncOp)


@contextlib.contextmanager
def megatron_te_layer_spec_available():
    """Let megatron build its TE layer spec where TE is not installed (a no-op where it is)."""
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    if gpt_layer_specs.HAVE_TE:
        yield
        return
    saved = provider.is_te_min_version
    gpt_layer_specs.TESpecProvider = provider.TESpecProvider
    provider.is_te_min_version = lambda *a, **k: True  # TE 2.9-2.11: every version gate is passed
    try:
        yield
    finally:
        provider.is_te_min_version = saved
        del gpt_layer_specs.TESpecProvider


def _te_class_names() -> dict[int, str]:
    from megatron.core.extensions import transformer_engine as ext

    return {id(getattr(ext, name)): name for name in TE_PARAMS}


def spec_parameter_names(spec, params: dict | None = None) -> list[str]:
    """Parameter names of one layer built from ``spec`` (leaf modules looked up in ``params``:
    a class -> names, or TE class names via :data:`TE_PARAMS`)."""
    te = _te_class_names()
    table = {**LOCAL_PARAMS, **(params or {})}
    out: list[str] = []

    def walk(node, path: str) -> None:
        module = getattr(node, "module", node)
        sub = getattr(node, "submodules", None)
        if sub is not None and dataclasses.is_dataclass(sub):
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                if value is None or isinstance(value, dict):
                    continue
                walk(value, f"{path}{f.name}.")
            return
        if module in _SKIP or (callable(module) and not isinstance(module, type) and id(module) not in te):
            return  # identity slots and the bias-dropout-add functions hold no parameters
        if id(module) in te:
            names = TE_PARAMS[te[id(module)]]
        elif module in table:
            names = table[module]
        else:
            raise KeyError(f"no parameter table for {module!r} at {path or '<layer>'}")
        out.extend(path + n for n in names)

    walk(spec, "")
    return out


def model_parameter_names(hf_config, layer_names: list[str]) -> set[str]:
    """The whole language model's parameter names for a layer's names (PP = 1; vision excluded)."""
    names = {"language_model.embedding.word_embeddings.weight", "language_model.decoder.final_layernorm.weight"}
    if not hf_config.tie_word_embeddings:
        names.add("language_model.output_layer.weight")
    for i in range(hf_config.text_config.num_hidden_layers):
        names |= {f"language_model.decoder.layers.{i}.{n}" for n in layer_names}
    return names


class TorchLayerNormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm then a column-parallel linear, holding the norm as TE's LayerNormLinear does
    (``layer_norm_weight`` beside ``weight``), computed as :class:`RMSNorm` computes it."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        setattr(self.layer_norm_weight, "sequence_parallel", bool(config.sequence_parallel))
        self.eps = config.layernorm_epsilon

    def forward(self, x, *args, **kwargs):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return super().forward(self.layer_norm_weight * x32.to(x.dtype), *args, **kwargs)


def torch_te_layout_spec():
    """The local layer spec rearranged as megatron's TE spec is: pre-norms inside the linears."""
    from megatron_prism.models.qwen3vl.spec import qwen3vl_layer_spec

    spec = qwen3vl_layer_spec("local")
    sub = spec.submodules
    sub.input_layernorm = IdentityOp
    sub.pre_mlp_layernorm = IdentityOp
    sub.self_attention.submodules.linear_qkv = TorchLayerNormColumnParallelLinear
    sub.mlp.submodules.linear_fc1 = TorchLayerNormColumnParallelLinear
    return spec
