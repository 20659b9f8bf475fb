"""Seeded, batch-composition-independent token sampling for the embedded engine.

Randomness is counter-based rather than drawn from a ``torch.Generator``: the one uniform number
behind the token at step ``j`` of sample row ``r`` is a hash of ``(seed, request key, sample
index, j)``. A row's draws therefore do not depend on which other rows share the batch, on how
requests are chunked, or on when other rows finish and leave the batch -- yet a step is a few
vectorised ops with no per-row generator loop. The token is drawn by inverting the (float64)
cumulative distribution of the candidates: the whole vocabulary, or the top-k / top-p survivors
(sorted), renormalised -- an exact sample of the truncated distribution, at a few passes over the
logits (this matters on CPU with a 150k vocabulary).

Log-probs: for ``temperature > 0`` the returned log-prob is ``log_softmax(logits / T)`` at the
chosen token, i.e. the temperature-scaled distribution *before* top-k/top-p truncation -- what a
trainer recomputes when it divides the policy's logits by the rollout temperature (as verl does).
For greedy decoding (``temperature == 0``) it is ``log_softmax(logits)`` (temperature 1).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def request_keys(request_ids: Sequence[str]) -> list[int]:
    """One 32-bit key per request: a hash of its ``request_id`` (the k-th repeat of an id gets its
    own key), or of its position in the call when the id is empty."""
    keys, seen = [], {}
    for i, rid in enumerate(request_ids):
        if rid:
            k = seen[rid] = seen.get(rid, -1) + 1
            keys.append(_mix_int(zlib.crc32(f"{rid}\x00{k}".encode())))
        else:
            keys.append(_mix_int(zlib.crc32(f"\x01{i}".encode())))
    return keys


def row_keys(req_keys: Sequence[int], n: int, seed: int, device: torch.device) -> Tensor:
    """Per sample row (request-major, ``n`` rows per request) a 32-bit key mixing seed, request
    key and sample index."""
    s = _mix_int(seed ^ _mix_int(seed >> 32) ^ 0x5BD1E995)
    keys = [_mix_int(_mix_int(k ^ s) + 0x9E3779B9 * (i + 1)) for k in req_keys for i in range(n)]
    return torch.tensor(keys, dtype=torch.int64, device=device)


class Sampler:
    """Turns a step's logits ``[rows, vocab]`` into tokens and their log-probs."""

    def __init__(self, vocab: int, temperature: float, top_k: int, top_p: float, device: torch.device,
                 banned_ids=()) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.banned = torch.tensor(sorted(set(banned_ids)), dtype=torch.long, device=device) if banned_ids else None
        self.top_k = top_k if 0 < top_k < vocab else -1
        self.greedy = temperature == 0

    @staticmethod
    def uniforms(keys: Tensor, step: int) -> Tensor:
        """One float64 uniform in (0, 1) per row key, for this step."""
        bits = mix32(mix32(keys ^ _mix_int(step * 0x27D4EB2F + 0x61C88647)) ^ 0x2545F491)
        return (bits.double() + 0.5) * (1.0 / (1 << 32))

    def __call__(self, logits: Tensor, keys: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """``logits`` float32 ``[rows, vocab]``; ``keys`` the rows' keys. Returns (tokens, logprobs)."""
        if self.banned is not None:
            logits = logits.index_fill(-1, self.banned, float("-inf"))
        if self.greedy:
            tokens = logits.argmax(-1)
            logp = torch.log_softmax(logits, -1)
            return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
        scaled = logits / self.temperature
        logp = torch.log_softmax(scaled, -1)
        order = None  # candidates: the whole vocabulary, or (sorted) the top-k / top-p survivors
        if self.top_k > 0:
            values, order = torch.topk(scaled, self.top_k, dim=-1)
        elif self.top_p < 1.0:
            values, order = torch.sort(scaled, dim=-1, descending=True)
        if order is None:
            probs = logp.exp()
        else:
            probs = torch.softmax(values, dim=-1)
            if self.top_p < 1.0:  # keep the smallest prefix whose mass reaches top_p
                drop = (probs.cumsum(-1) - probs) > self.top_p
                drop[:, 0] = False
                probs = probs.masked_fill(drop, 0.0)
        cdf = probs.cumsum(-1, dtype=torch.float64)
        target = (self.uniforms(keys, step) * cdf[:, -1])[:, None]
        choice = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
        tokens = (choice if order is None else order.gather(-1, choice)).squeeze(-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
