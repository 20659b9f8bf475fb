"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron's ``DotProductAttention`` in a layer spec (same constructor and forward
signature). Why our own: megatron's local attention allocates its score buffer on
``torch.cuda.current_device()`` and only knows causal masks, while SDPA runs on any device (flash /
memory-efficient kernels on GPU, a fused CPU kernel here) and takes arbitrary boolean masks, which
padded batches need. It is the attention of the local spec on CPU and GPU alike; the Transformer
Engine spec uses TE's attention instead.

It also takes megatron's THD packed layout (``packed_seq_params.qkv_format == "thd"``: q, k, v of
shape [t, heads, dim], samples delimited by ``cu_seqlens``), attending causally within each sample
as TE's padding_causal THD attention does. The local spec never sends THD (it isolates packed
samples with a dense mask); this path lets the CPU check the THD plumbing the TE spec relies on
(megatron's THD rotary, the squeezed shapes) against the dense-mask path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Attention core: softmax(q k^T * scale + mask) v, for [s, b, heads, dim] inputs.

    ``attention_mask`` follows megatron's convention: a boolean tensor broadcastable to
    ``[b, 1, sq, sk]`` where True means *masked out*; ``None`` means plain causal attention.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use the TE spec")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            return self._thd(query, key, value, packed_seq_params)
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPACoreAttention")
        sq, b, heads, dim = query.shape
        groups = key.shape[2]
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if heads != groups:  # grouped-query attention: each KV head serves heads/groups queries
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        if attention_mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=sq > 1, dropout_p=dropout, scale=self.scale
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.scale
            )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _thd(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """[t, heads, dim] q/k/v of samples packed back to back -> [t, heads * dim]."""
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed_seq_params.qkv_format {packed_seq_params.qkv_format!r} is not supported; use 'thd'")
        if packed_seq_params.cu_seqlens_q_padded is not None or packed_seq_params.cu_seqlens_kv_padded is not None:
            raise ValueError("SDPACoreAttention takes unpadded THD (cu_seqlens_*_padded must be None)")
        t = query.shape[0]
        cu = packed_seq_params.cu_seqlens_q
        if not torch.equal(cu, packed_seq_params.cu_seqlens_kv) or int(cu[-1]) != t:
            raise ValueError(f"THD self-attention needs cu_seqlens_q == cu_seqlens_kv ending at {t} tokens")
        sample = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=query.device),
                                         (cu[1:] - cu[:-1]).to(query.device).long())
        causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
        masked = ~(causal & (sample[:, None] == sample[None, :]))
        # as the [s, b=1, h, d] path with a [1, 1, t, t] mask
        out = self.forward(query[:, None], key[:, None], value[:, None], masked[None, None])
        return out.reshape(t, -1)
