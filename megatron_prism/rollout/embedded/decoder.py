"""The embedded engine's compact Qwen3-VL text decoder: prefill and one-token decode steps.

Plain torch functions over :class:`~megatron_prism.rollout.embedded.weights.Qwen3VLWeights`:
RMSNorm (in float32, as HF does), a fused q/k/v matmul, per-head q/k RMSNorm, interleaved MRoPE
(angles from our :class:`InterleavedMRoPE`), grouped-query attention against a preallocated KV cache,
a fused gate/up SwiGLU MLP, DeepStack injection at image positions after the first layers
(prefill only), final norm and LM head. Shapes: ``B`` prompt rows, ``R`` sample rows
(``B * n``; the prompt's keys/values are written once per sample row), ``P`` padded prompt
length, ``S`` cache length.

The cache is one tensor ``[layers, 2, R, kv_heads, S, head_dim]``; finished rows are compacted
out by the engine, so a decode step only ever computes live rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_prism.models.qwen3vl.rope import InterleavedMRoPE
from megatron_prism.rollout.embedded.weights import Qwen3VLWeights


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's Qwen3 RMSNorm: normalise in float32, round to the input dtype, then scale.

    For float32 inputs a ``[D]`` weight is fused into ``F.rms_norm`` (bit-identical there); for
    half types, or a weight table broadcast over heads, it is applied after the rounding.
    """
    if x.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


def rotate(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Half-split rotary embedding ``x * cos + rotate_half(x) * sin``, written as
    ``x * cos + roll(x, D/2) * [-sin_1, sin_2]`` (``sin_signed``), three kernels."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def _cos_sin(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    half = angles.shape[-1] // 2
    sin = angles.sin()
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return angles.cos().to(dtype), sin.to(dtype)


class Decoder:
    """Stateless compute over a weight store; the KV cache is passed in by the engine."""

    def __init__(self, config, weights: Qwen3VLWeights, device: torch.device) -> None:
        tc = config.text_config
        self.w = weights
        self.eps = tc.rms_norm_eps
        self.heads, self.kv_heads = tc.num_attention_heads, tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.num_layers = tc.num_hidden_layers
        rope = tc.rope_parameters
        self.rope = InterleavedMRoPE(self.head_dim, rope["rope_theta"], rope["mrope_section"]).to(device)
        self.inv_freq = self.rope.inv_freq
        # decode attention: written out on CPU (cheaper than SDPA's kernel for one query row),
        # SDPA's fused kernels on GPU
        self.manual_decode_attention = torch.device(device).type == "cpu"
        # transposed views for addmm (views stay valid across weight release/resume and updates)
        self.transposed = [(lw.o.t(), lw.down.t()) for lw in weights.layers]

    # --- rotary tables --------------------------------------------------------------------------
    def prefill_rotary(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``[3, B, P]`` MRoPE ids -> cos, sin ``[B, P, 1, D]``."""
        return _cos_sin(self.rope(position_ids).permute(1, 0, 2, 3), dtype)  # [B, P, 1, D]

    def rotary_table(self, max_position: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, signed sin ``[max_position + 1, D]`` of text positions (equal on all three MRoPE
        axes, so the interleaving is moot); decode steps gather their rows."""
        pos = torch.arange(max_position + 1, device=self.inv_freq.device)
        f = pos[:, None].float() * self.inv_freq
        return _cos_sin(torch.cat((f, f), dim=-1), dtype)

    # --- shared pieces ------------------------------------------------------------------------
    def _qkv(self, lw, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [N, T, h]`` -> q ``[N, T, H, D]``, k, v ``[N, T, K, D]`` (q, k normed and rotated).

        q and k are normed (per-head weights stored as one ``[H + K, D]`` table) and rotated together.
        """
        n, t, _ = x.shape
        qkv = F.linear(rms_norm(x, lw.ln1, self.eps), lw.qkv).view(n, t, self.heads + 2 * self.kv_heads, self.head_dim)
        qk, v = qkv.split((self.heads + self.kv_heads, self.kv_heads), dim=2)
        q, k = rotate(rms_norm(qk, lw.qk_norm, self.eps), cos, sin).split((self.heads, self.kv_heads), dim=2)
        return q, k, v

    def _finish_layer(self, lw, x: Tensor, attn: Tensor) -> Tensor:
        """Attention output ``[N, H, T, D]`` -> o_proj + residual, then the SwiGLU MLP + residual."""
        n, _, t, _ = attn.shape
        x = x + F.linear(attn.transpose(1, 2).reshape(n, t, -1), lw.o)
        gate, up = F.linear(rms_norm(x, lw.ln2, self.eps), lw.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, lw.down)

    def logits(self, hidden: Tensor) -> Tensor:
        """Last hidden states ``[N, h]`` -> float32 logits ``[N, vocab]``."""
        return F.linear(rms_norm(hidden, self.w.norm, self.eps), self.w.lm_head).float()

    # --- prefill ------------------------------------------------------------------------------
    def prefill(self, x: Tensor, position_ids: Tensor, pad_mask: Tensor, cache: Tensor, n: int,
                visual_index: tuple[Tensor, Tensor] | None = None, deepstack: list[Tensor] | None = None) -> Tensor:
        """Run the left-padded prompts ``x [B, P, h]`` (``pad_mask [B, P]`` True at real tokens),
        write their keys/values into cache rows ``[0, B * n)`` (each prompt row repeated ``n``
        times) at slots ``[0, P)``, and return the last position's logits ``[B, vocab]``.

        ``visual_index`` = (batch idx, position idx) of the image tokens; ``deepstack[i]`` (features
        in the same order) is added there after layer ``i``.
        """
        b, p, _ = x.shape
        cos, sin = self.prefill_rotary(position_ids, x.dtype)
        causal = torch.ones(p, p, dtype=torch.bool, device=x.device).tril_()
        eye = torch.eye(p, dtype=torch.bool, device=x.device)
        # pads attend only to themselves (finite garbage, never read); real tokens skip the pads
        mask = (causal & (pad_mask[:, None, :] | eye))[:, None]
        for i, lw in enumerate(self.w.layers):
            q, k, v = self._qkv(lw, x, cos, sin)
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, K, P, D]
            if n > 1:
                cache[i, 0, : b * n, :, :p] = kt.repeat_interleave(n, dim=0)
                cache[i, 1, : b * n, :, :p] = vt.repeat_interleave(n, dim=0)
            else:
                cache[i, 0, :b, :, :p] = kt
                cache[i, 1, :b, :, :p] = vt
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=True)
            x = self._finish_layer(lw, x, attn)
            if deepstack is not None and i < len(deepstack):
                x = x.index_put(visual_index, deepstack[i].to(x.dtype), accumulate=True)
        return self.logits(x[:, -1])

    # --- decode ------------------------------------------------------------------------------
    def decode(self, tokens: Tensor, cos: Tensor, sin: Tensor, slot: int, bias: Tensor,
               kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One step for the ``R`` live rows; returns float32 logits ``[R, vocab]``.

        ``tokens [R]``; ``cos``/``sin`` ``[R, 1, D]`` of their positions; their keys/values go to
        cache slot ``slot``; ``bias [R, slot + 1]`` is 0 at attendable slots and -inf elsewhere;
        ``kv[i]`` = layer ``i``'s (keys, values) cache views ``[R, K, S, D]``. Hidden states stay
        2-D ``[R, h]`` (residual adds fused into ``addmm``); on CPU attention is written out with
        q grouped per KV head (``[R, K, G, D]``, softmax in float32), which costs less than SDPA's
        kernel for a single query row; on GPU it is SDPA.
        """
        r = tokens.shape[0]
        hq, hk, d, eps = self.heads, self.kv_heads, self.head_dim, self.eps
        x = F.embedding(tokens, self.w.embed)  # [R, h]
        bias = bias[:, None, None, :]
        for lw, (o_t, down_t), (kc, vc) in zip(self.w.layers, self.transposed, kv):
            qkv = F.linear(rms_norm(x, lw.ln1, eps), lw.qkv).view(r, hq + 2 * hk, d)
            qk = rotate(rms_norm(qkv[:, : hq + hk], lw.qk_norm, eps), cos, sin)
            kc[:, :, slot] = qk[:, hq:]
            vc[:, :, slot] = qkv[:, hq + hk:]
            keys, values = kc[:, :, : slot + 1], vc[:, :, : slot + 1]
            if self.manual_decode_attention:
                scores = torch.matmul(qk[:, :hq].view(r, hk, hq // hk, d), keys.transpose(-1, -2))
                probs = torch.softmax(torch.add(bias, scores, alpha=self.scale), dim=-1, dtype=torch.float32)
                attn = torch.matmul(probs.to(values.dtype), values).view(r, hq * d)
            else:
                attn = F.scaled_dot_product_attention(qk[:, :hq].unsqueeze(2), keys, values, attn_mask=bias,
                                                      scale=self.scale, enable_gqa=True).view(r, hq * d)
            x = torch.addmm(x, attn, o_t)
            gate, up = F.linear(rms_norm(x, lw.ln2, eps), lw.gate_up).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate).mul_(up), down_t)
        return self.logits(x)
