"""The embedded engine's weights, addressed by their Hugging Face names.

The decoder wants fused matrices (one ``qkv`` and one ``gate_up`` matmul per layer) while the
trainer streams HF-named tensors (``...self_attn.q_proj.weight``, ``...mlp.up_proj.weight``). So
each fused matrix is allocated once and every HF name maps to a *view* of its slice: copying an
update into the view writes the fused matrix in place and nothing has to be re-fused.

Releasing the ``weights`` memory shrinks every underlying storage to zero bytes (the tensors and
their views stay valid objects, as FSDP does with its flat parameters); resuming grows them back
with undefined contents, so every name is marked missing until ``load`` has rewritten it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

TEXT = "model.language_model."
VISION = "model.visual."


def load_hf_config(source: str | Path):
    """``Qwen3VLConfig`` from a HF directory."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig.from_pretrained(str(source))


def read_hf_tensors(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a HF safetensors directory (one file or an indexed set of shards)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return tensors


class LayerWeights:
    """One decoder layer's tensors, fused where the decoder fuses them."""

    __slots__ = ("ln1", "qkv", "qk_norm", "o", "ln2", "gate_up", "down")

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, **kw) -> None:
        self.ln1 = torch.empty(hidden, **kw)
        self.qkv = torch.empty((heads + 2 * kv_heads) * head_dim, hidden, **kw)
        self.qk_norm = torch.empty(heads + kv_heads, head_dim, **kw)  # q_norm in every q row, then k_norm
        self.o = torch.empty(hidden, heads * head_dim, **kw)
        self.ln2 = torch.empty(hidden, **kw)
        self.gate_up = torch.empty(2 * inter, hidden, **kw)
        self.down = torch.empty(hidden, inter, **kw)


class Qwen3VLWeights:
    """Text-decoder tensors (fused, HF-named views) plus transformers' vision tower."""

    def __init__(self, config, device: torch.device, dtype: torch.dtype) -> None:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        tc = config.text_config
        if getattr(tc, "attention_bias", False):
            raise ValueError("config.json sets attention_bias: the embedded engine has no q/k/v/o biases (Qwen3-VL "
                             "has none); use rollout.engine=sglang or vllm for this model")
        if tc.hidden_act != "silu":
            raise ValueError(f"config.json sets hidden_act {tc.hidden_act!r}: the embedded engine implements SwiGLU "
                             "(silu) only; use rollout.engine=sglang or vllm for this model")
        kw = dict(device=device, dtype=dtype)
        self.tied = bool(config.tie_word_embeddings)
        h, heads, kvh = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
        hd = getattr(tc, "head_dim", None) or h // heads
        inter = tc.intermediate_size
        self.embed = torch.empty(tc.vocab_size, h, **kw)
        self.norm = torch.empty(h, **kw)
        self.lm_head = self.embed if self.tied else torch.empty(tc.vocab_size, h, **kw)
        self.layers = [LayerWeights(h, heads, kvh, hd, inter, **kw) for _ in range(tc.num_hidden_layers)]

        names: dict[str, Tensor] = {TEXT + "embed_tokens.weight": self.embed, TEXT + "norm.weight": self.norm}
        if not self.tied:
            names["lm_head.weight"] = self.lm_head
        q, k = heads * hd, kvh * hd
        for i, lw in enumerate(self.layers):
            p = f"{TEXT}layers.{i}."
            names.update({
                p + "input_layernorm.weight": lw.ln1,
                p + "self_attn.q_proj.weight": lw.qkv[:q],
                p + "self_attn.k_proj.weight": lw.qkv[q:q + k],
                p + "self_attn.v_proj.weight": lw.qkv[q + k:],
                p + "self_attn.q_norm.weight": lw.qk_norm[:heads],  # [D] updates broadcast over rows
                p + "self_attn.k_norm.weight": lw.qk_norm[heads:],
                p + "self_attn.o_proj.weight": lw.o,
                p + "post_attention_layernorm.weight": lw.ln2,
                p + "mlp.gate_proj.weight": lw.gate_up[:inter],
                p + "mlp.up_proj.weight": lw.gate_up[inter:],
                p + "mlp.down_proj.weight": lw.down,
            })
        vcfg = config.vision_config
        vcfg._attn_implementation = "sdpa"
        self.visual = Qwen3VLVisionModel(vcfg).to(device).eval().requires_grad_(False)
        for param in self.visual.parameters():  # rotary inv_freq buffers stay float32, as in HF
            param.data = param.data.to(dtype)
        for name, tensor in self.visual.state_dict(keep_vars=True).items():
            names[VISION + name] = tensor.data
        self.names = names
        # the HF shape of each name (the per-head norms are stored broadcast over their heads)
        self.shapes = {n: (hd,) if n.endswith(("q_norm.weight", "k_norm.weight")) else tuple(t.shape)
                       for n, t in names.items()}
        # The distinct storages behind all names (views share their fused matrix's storage).
        seen: dict[int, Tensor] = {}
        for t in names.values():
            seen.setdefault(id(t.untyped_storage()._cdata), t)
        self._storages = [(t.untyped_storage(), t.untyped_storage().nbytes()) for t in seen.values()]
        self.missing: set[str] = set(names)
        self.released = False

    # --- loading -------------------------------------------------------------------------------
    def _resolve(self, name: str) -> str | None:
        if self.tied and name == "lm_head.weight":  # state_dict() of a tied model lists the alias
            return TEXT + "embed_tokens.weight"
        return name if name in self.names else None

    def load(self, tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor]) -> None:
        """Copy HF-named tensors in place; the whole group is checked before anything is written."""
        if self.released:
            raise RuntimeError("weights are released; call resume_memory(['weights']) before update_weights")
        items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
        unknown = [n for n, _ in items if self._resolve(n) is None]
        if unknown:
            raise KeyError(f"unknown weight names for the embedded Qwen3-VL engine: {unknown[:8]}"
                           + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""))
        bad = [f"{n}: got {tuple(t.shape)}, expected {self.shapes[self._resolve(n)]}"
               for n, t in items if tuple(t.shape) != self.shapes[self._resolve(n)]]
        if bad:
            raise ValueError("weight shape mismatch: " + "; ".join(bad[:8]))
        with torch.no_grad():
            for name, tensor in items:
                target = self._resolve(name)
                self.names[target].copy_(tensor)
                self.missing.discard(target)

    # --- memory --------------------------------------------------------------------------------
    def release(self) -> None:
        for storage, _ in self._storages:
            storage.resize_(0)
        self.missing = set(self.names)
        self.released = True

    def resume(self) -> None:
        if not self.released:
            return
        for storage, nbytes in self._storages:
            storage.resize_(nbytes)
        self.released = False

    def nbytes(self) -> int:
        return sum(n for _, n in self._storages)
