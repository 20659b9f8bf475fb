"""The policy's training head: final hidden states -> log-prob (and entropy) of given target tokens.

Training never needs the full ``[tokens, vocab]`` logits, only the log-prob of the sampled token
(and, for an entropy bonus or metric, the entropy). ``kernels/fused_linear_logprob.py`` computes
both from the hidden states and this rank's shard of the output weight without materialising
logits, combining the per-row statistics over the tensor-parallel group like megatron's
vocab-parallel cross-entropy.

The kernel returns only this rank's share of ``d loss / d hidden``; the shares are summed over
the TP group by the same megatron mapping a ``ColumnParallelLinear`` applies to its input
(all-reduce in backward, or reduce-scatter when the sequence is split by sequence parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel

HEAD_BACKENDS = ("auto", "triton", "torch")


@dataclass
class TokenLogProbs:
    """Per-token outputs of the training head, ``[b, s]`` float32 (entropy may be ``None``)."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None


IGNORE_INDEX = -100


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[b, s] id of the token that follows each position; ``IGNORE_INDEX`` at the last position and
    wherever this or the following token is padding (a left-padding position "predicting" the
    first real token is not a prediction)."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        has_next = torch.zeros_like(input_ids, dtype=torch.bool)
        has_next[:, :-1] = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        targets[~has_next] = IGNORE_INDEX
    return targets


def _kernel(backend: str, on_cuda: bool):
    from kernels import fused_linear_logprob as flp

    if backend == "auto":
        backend = "triton" if on_cuda else "torch"
    if backend not in HEAD_BACKENDS:
        raise ValueError(f"unknown log-prob head backend {backend!r}; choose one of {', '.join(HEAD_BACKENDS)}")
    return flp.fused_linear_logprob if backend == "triton" else flp.linear_logprob_reference


def token_logprobs(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    sequence_parallel: bool,
    with_entropy: bool = False,
    backend: str = "auto",
) -> TokenLogProbs:
    """``hidden`` [s, b, h] final-normed (this rank's sequence slice under SP), ``output_weight``
    [V / tp, h] this rank's vocab shard, ``targets`` [b, s] global token ids (-100: ignored, logp 0).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if sequence_parallel and tp > 1:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif tp > 1:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    s, b, h = hidden.shape
    if targets.shape != (b, s):
        raise ValueError(f"targets must be [batch, seq] = {(b, s)}, got {tuple(targets.shape)}")
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * output_weight.shape[0]
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    fn = _kernel(backend, hidden.is_cuda)
    out = fn(
        hidden.reshape(s * b, h),
        output_weight,
        targets.transpose(0, 1).reshape(s * b),
        vocab_start=vocab_start,
        tp_group=group,
        with_entropy=with_entropy,
    )
    logp, entropy = out if with_entropy else (out, None)
    logp = logp.reshape(s, b).transpose(0, 1)
    if entropy is not None:
        entropy = entropy.reshape(s, b).transpose(0, 1)
    return TokenLogProbs(logp=logp, entropy=entropy)
