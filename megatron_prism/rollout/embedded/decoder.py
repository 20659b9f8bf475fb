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
        # float32 on CPU: decode steps in the fewest kernels (_decode_cpu); elsewhere SDPA's fused kernels
        self.cpu_decode = torch.device(device).type == "cpu" and weights.embed.dtype == torch.float32
        # transposed views for addmm (views stay valid across weight release/resume and updates)
        self.transposed = [(lw.o.t(), lw.down.t()) for lw in weights.layers]
        self._eps_t: Tensor | None = None  # eps as a 0-d tensor, the addcmul input of _rms_scale
        self._cpu_tables = None  # the CPU decode path's matrices, from begin_generate to end_generate

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
        if self._cpu_tables is not None:
            return self._prefill_cpu(x, cos, sin, mask, cache, n, visual_index, deepstack, pad_mask)
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
        if self.cpu_decode:
            return self._decode_cpu(tokens, cos, sin, slot, bias, kv)
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
            attn = F.scaled_dot_product_attention(qk[:, :hq].unsqueeze(2), keys, values, attn_mask=bias,
                                                  scale=self.scale, enable_gqa=True).view(r, hq * d)
            x = torch.addmm(x, attn, o_t)
            gate, up = F.linear(rms_norm(x, lw.ln2, eps), lw.gate_up).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate).mul_(up), down_t)
        return self.logits(x)

    # --- CPU decode -----------------------------------------------------------------------------
    def _rms_scale(self, x: Tensor) -> Tensor:
        """``1 / sqrt(mean(x^2) + eps)`` over the last dim, keepdim: three kernels (a norm, one
        ``addcmul`` for the mean and eps, an in-place rsqrt) where ``F.rms_norm``'s CPU path runs
        about nine (dtype copies, pow, sum, div, add, rsqrt, two muls)."""
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return torch.addcmul(self._eps_t, n, n, value=1.0 / x.shape[-1]).rsqrt_()

    def begin_generate(self) -> None:
        """Build the CPU decode path's matrices from the current weights (they do not change during
        a ``generate``; :meth:`end_generate` frees them). Per layer, transposed for ``mm``:

        - ``[q; k; v; roll(q); roll(k)] * ln1``: the input norm's weight folded into the columns, and
          q/k's rows also rolled by half a head, so the matmul yields the rotary's ``rotate_half``
          operand as well (``roll`` is linear, so ``roll(x @ W^T) = x @ roll_rows(W)^T``);
        - ``[gate; up] * ln2``, and the LM head times the final norm's weight;
        - the stacked per-head q/k norm weights and their half-rolled copy, folded into each step's
          rotary tables (``rotate(n * w) = n * (w * cos) + roll(n) * (roll(w) * sin)``).
        """
        if not self.cpu_decode:
            return
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        qk_rows = (hq + hk) * d
        mats = []
        with torch.no_grad():
            for lw in self.w.layers:
                qk = lw.qkv[:qk_rows]
                rolled = qk.view(hq + hk, d, -1).roll(d // 2, 1).reshape(qk_rows, -1)
                qkv = torch.cat((lw.qkv, rolled)).mul_(lw.ln1)
                mats.append((qkv.t(), lw.o.t(), (lw.gate_up * lw.ln2).t(), lw.down.t()))
            w = torch.stack([lw.qk_norm for lw in self.w.layers])[:, None]  # [L, 1, H + K, D]
            # the final norm's weight folded into the LM head's columns as well
            self._cpu_tables = mats, w, w.roll(d // 2, -1), (self.w.lm_head * self.w.norm).t()
            if self._eps_t is None or self._eps_t.device != w.device:
                self._eps_t = torch.tensor(self.eps, dtype=torch.float32, device=w.device)

    def end_generate(self) -> None:
        """Free what :meth:`begin_generate` built (the engine's memory is its weights and cache)."""
        self._cpu_tables = None

    def _prefill_cpu(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: Tensor, n: int,
                     visual_index: tuple[Tensor, Tensor] | None, deepstack: list[Tensor] | None,
                     pad_mask: Tensor) -> Tensor:
        """:meth:`prefill` on :meth:`begin_generate`'s matrices (as :meth:`_decode_cpu`).

        Token-wise work runs on the ``T`` real tokens only, packed to ``[T, h]`` rows (residual adds
        fused into ``addmm``): with mixed prompt lengths left padding is a large share of ``B * P``
        (43 % in tools/bench_rollout.py at batch 16), and on CPU those rows cost matmul FLOPs. Only
        attention and the cache writes see the padded ``[B, P]`` layout: q/k/v are scattered
        into zeroed padded buffers (pads keep q = k = v = 0 and attend only to themselves: finite,
        never read), the attention output gathered back.
        """
        mats, w, w_rolled, lm_head_t = self._cpu_tables
        b, p, h = x.shape
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        qk_heads, g = hq + hk, hq // hk
        flat_mask = pad_mask.reshape(b * p)
        real = flat_mask.nonzero().squeeze(1)  # [T] packed row -> padded row
        t = real.numel()
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))[:, :, None]
        cos_w = (cos.reshape(b * p, 1, d).index_select(0, real)[None] * w).unbind(0)  # per layer [T, H + K, D]
        sin_w = (sin.reshape(b * p, 1, d).index_select(0, real)[None] * w_rolled).unbind(0)
        x = x.reshape(b * p, h).index_select(0, real)
        qk_pad = torch.zeros(b * p, qk_heads, d, dtype=x.dtype, device=x.device)
        v_pad = torch.zeros(b * p, hk, d, dtype=x.dtype, device=x.device)
        q_pad, k_pad = qk_pad.view(b, p, qk_heads, d).split((hq, hk), dim=2)
        kt, vt = k_pad.transpose(1, 2), v_pad.view(b, p, hk, d).transpose(1, 2)  # [B, K, P, D] views
        vis_rows = None
        if deepstack is not None:  # image positions as packed rows
            packed_row = flat_mask.cumsum(0).sub_(1).view(b, p)
            vis_rows = packed_row[visual_index]
        for i, ((qkv_t, o_t, gate_up_t, down_t), cw, sw) in enumerate(zip(mats, cos_w, sin_w)):
            out = torch.mm(x, qkv_t).mul_(self._rms_scale(x)).view(t, 2 * qk_heads + hk, d)
            qk = out.narrow(1, 0, qk_heads)
            qk = torch.addcmul(qk * cw, out.narrow(1, qk_heads + hk, qk_heads), sw).mul_(self._rms_scale(qk))
            qk_pad.index_copy_(0, real, qk)
            v_pad.index_copy_(0, real, out.narrow(1, qk_heads, hk))
            cache[i, 0, : b * n, :, :p] = kt.repeat_interleave(n, dim=0) if n > 1 else kt
            cache[i, 1, : b * n, :, :p] = vt.repeat_interleave(n, dim=0) if n > 1 else vt
            # attention written out, q grouped per KV head ([B, K, G * P, D] rows), cheaper than SDPA
            # with a mask at these sizes
            q = q_pad.transpose(1, 2).reshape(b, hk, g * p, d)
            scores = torch.matmul(q, kt.transpose(-1, -2)).view(b, hk, g, p, p)
            probs = torch.softmax(torch.add(bias, scores, alpha=self.scale), dim=-1).view(b, hk, g * p, p)
            attn = torch.matmul(probs, vt).view(b, hq, p, d).transpose(1, 2).reshape(b * p, hq * d)
            x = torch.addmm(x, attn.index_select(0, real), o_t)
            gate, up = torch.mm(x, gate_up_t).mul_(self._rms_scale(x)).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate).mul_(up), down_t)
            if deepstack is not None and i < len(deepstack):
                x = x.index_add(0, vis_rows, deepstack[i].to(x.dtype))
        last = x.index_select(0, flat_mask.view(b, p).sum(1).cumsum(0).sub_(1))  # prompts end at P - 1
        return torch.mm(last, lm_head_t).mul_(self._rms_scale(last))

    def _decode_cpu(self, tokens: Tensor, cos: Tensor, sin: Tensor, slot: int, bias: Tensor,
                    kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        """:meth:`decode` on CPU in float32, where a step of a small model is bound by the number
        of kernels, not by FLOPs (profiled: ``F.rms_norm`` alone was a quarter of the engine's
        time). The same maths in fewer kernels, on :meth:`begin_generate`'s matrices: an RMSNorm's
        row scale commutes with the matmul after it (``(x * s * w) @ W^T = s * (x @ (W * w)^T)``),
        so it is applied to the matmul's output, and a per-head scale likewise after the rotary.
        Rounding differs from HF's order at the float32 ulp level (greedy tokens equal to
        ``generate``: tests/rollout/test_embedded_engine.py).
        """
        if self._cpu_tables is None:
            raise RuntimeError("Decoder.begin_generate() must precede CPU decode steps")
        mats, w, w_rolled, lm_head_t = self._cpu_tables
        r = tokens.shape[0]
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        g, s, qk_heads = hq // hk, slot + 1, hq + hk
        cos_w = (cos[None] * w).unbind(0)  # per layer [R, H + K, D]
        sin_w = (sin[None] * w_rolled).unbind(0)
        x = F.embedding(tokens, self.w.embed)  # [R, h]
        # [R * K, 1, S]: one copy per step, so that each layer's bias add fuses into baddbmm
        bias = bias.view(r, 1, s).expand(r, hk, s).reshape(r * hk, 1, s)
        # narrow/select rather than [] indexing: at this size Python's slice parsing is a visible cost
        for (qkv_t, o_t, gate_up_t, down_t), (kc, vc), cw, sw in zip(mats, kv, cos_w, sin_w):
            out = torch.mm(x, qkv_t).mul_(self._rms_scale(x)).view(r, 2 * qk_heads + hk, d)
            qk = out.narrow(1, 0, qk_heads)
            qk = torch.addcmul(qk * cw, out.narrow(1, qk_heads + hk, qk_heads), sw).mul_(self._rms_scale(qk))
            kc.select(2, slot).copy_(qk.narrow(1, hq, hk))
            vc.select(2, slot).copy_(out.narrow(1, qk_heads, hk))
            # [R * K, S, D] views of the cache (a slice along S keeps R and K mergeable)
            keys, values = kc.narrow(2, 0, s).reshape(r * hk, s, d), vc.narrow(2, 0, s).reshape(r * hk, s, d)
            scores = torch.baddbmm(bias, qk.narrow(1, 0, hq).reshape(r * hk, g, d), keys.transpose(1, 2),
                                   alpha=self.scale)
            x = torch.addmm(x, torch.bmm(torch.softmax(scores, dim=-1), values).view(r, hq * d), o_t)
            gate, up = torch.mm(x, gate_up_t).mul_(self._rms_scale(x)).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate).mul_(up), down_t)
        return torch.mm(x, lm_head_t).mul_(self._rms_scale(x))
