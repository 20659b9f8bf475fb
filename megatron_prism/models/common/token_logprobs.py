"""The policy's training head: final hidden states -> log-prob (and entropy) of given target tokens.

Training never needs the full ``[tokens, vocab]`` logits, only the log-prob of the sampled token
(and, for an entropy bonus or metric, the entropy). ``kernels/fused_linear_logprob.py`` computes
both from the hidden states and this rank's shard of the output weight one chunk of tokens at a
time (never all ``[tokens, vocab]`` logits, on a GPU or a CPU), combining the per-row statistics
over the tensor-parallel group like megatron's vocab-parallel cross-entropy, and adding the output
weight's gradient straight into megatron's fp32 ``main_grad``.

Backends: ``auto`` (the chunked head with its Triton kernels on a GPU, with torch ops on a CPU),
``triton`` / ``torch`` (that engine everywhere; ``triton`` on a CPU needs ``TRITON_INTERPRET=1``),
``reference`` (the readable definition that materialises the logits, for checks).

The kernel returns only this rank's share of ``d loss / d hidden``; the shares are summed over
the TP group by the same megatron mapping a ``ColumnParallelLinear`` applies to its input
(all-reduce in backward, or reduce-scatter when the sequence is split by sequence parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel

HEAD_BACKENDS = ("auto", "triton", "torch", "reference")


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


def _head(backend: str, on_cuda: bool):
    """The head function for a backend, with its engine bound."""
    import functools

    from kernels import fused_linear_logprob as flp

    if backend not in HEAD_BACKENDS:
        raise ValueError(f"unknown log-prob head backend {backend!r}; choose one of {', '.join(HEAD_BACKENDS)}")
    if backend == "reference":
        return flp.linear_logprob_reference
    engine = ("triton" if on_cuda else "torch") if backend == "auto" else backend
    return functools.partial(flp.fused_linear_logprob, engine=engine)


def token_logprobs(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    sequence_parallel: bool,
    with_entropy: bool = False,
    backend: str = "auto",
    vocab_size: int | None = None,
) -> TokenLogProbs:
    """``hidden`` [s, b, h] final-normed (this rank's sequence slice under SP), ``output_weight``
    [V / tp, h] this rank's vocab shard, ``targets`` [b, s] global token ids (-100: ignored, logp 0).
    ``vocab_size``: the real vocabulary when ``V`` includes padding rows; the head leaves the
    padding out of the softmax (log-probs, entropy) and gives it no gradient, without slicing the
    weight (a slice would lose its ``main_grad`` and send autograd a full-size gradient).
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
    fn = _head(backend, hidden.is_cuda)
    out = fn(
        hidden.reshape(s * b, h),
        output_weight,
        targets.transpose(0, 1).reshape(s * b),
        vocab_start=vocab_start,
        vocab_limit=vocab_size,
        tp_group=group,
        with_entropy=with_entropy,
    )
    logp, entropy = out if with_entropy else (out, None)
    logp = logp.reshape(s, b).transpose(0, 1)
    if entropy is not None:
        entropy = entropy.reshape(s, b).transpose(0, 1)
    return TokenLogProbs(logp=logp, entropy=entropy)
