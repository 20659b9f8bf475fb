"""Where the caption and the think+answer parts of a response are, from its token ids.

Each token id maps to the bytes it stands for (a table built once per tokenizer); a response's
text is the concatenation of its tokens' bytes, so a byte offset maps to a token by a cumulative
sum. The layout is checked with one regular expression over those bytes and the part ends are the
tokens holding the last byte of ``</caption>`` and of ``</answer>``: O(length) per row, exact for
any tokenization of the tags (one token, several, or merged with neighbouring text such as ``><``).

PRISM's critic instead decodes every prefix ``response[:k]`` until the decoded text contains the
caption (O(length^2) decodes per response, and wrong whenever decoding is not prefix-stable, e.g.
a multi-byte character split across tokens or whitespace normalised by the decoder); its policy
responses are scored at the last response token (``<|im_end|>`` or whatever ends the sample) while
teacher parts are scored at the end of a chat-templated turn (``<|im_end|>\\n``). Here both are
scored at the same kind of token: the one closing ``</caption>`` and the one closing ``</answer>``.

Validity is the rule of the ``format`` reward (:func:`megatron_prism.rewards.simple.check_format`):
special tokens (end of turn, padding) count as no text, then ``\\s*<caption>C</caption>\\s*<think>T
</think>\\s*<answer>A</answer>\\s*`` must match the whole response with each tag exactly once and C,
T, A not blank. A response that breaks it is reported invalid (never an exception).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_TAGS = (b"caption", b"think", b"answer")
_LAYOUT = re.compile(rb"\s*<caption>(.*?)</caption>\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_END_TEXT = (b"<|im_end|>", b"<|endoftext|>")


@dataclass(frozen=True)
class ResponseParts:
    """Token indices *within the response* (0 = first response token); -1 when invalid."""

    valid: bool
    caption_end: int = -1  # token holding the last byte of </caption>
    answer_end: int = -1  # token holding the last byte of </answer>


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted (what ByteLevel BPE vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class PartFinder:
    """Finds the parts of responses given as token ids; built from a token-id -> bytes table."""

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self.token_bytes = list(token_bytes)
        self.lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> PartFinder:
        """Table of a Hugging Face tokenizer: special tokens are empty (like ``skip_special_tokens``),
        added tokens are their literal text, ByteLevel vocabularies are mapped back to bytes, and
        vocabularies of literal strings (e.g. the embedded task's tokenizer) are UTF-8 encoded."""
        size = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        byte_level = _byte_level_decoder() if "ByteLevel" in kinds else None
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        table = []
        for i, piece in enumerate(pieces):
            if i in special:
                table.append(b"")
            elif i in added:
                table.append(added[i].encode())
            elif piece is None:
                table.append(b"")
            elif byte_level is not None:
                table.append(bytes(byte_level[c] for c in piece))
            elif "Fuse" in kinds or not decoder:
                table.append(piece.encode())
            else:  # other decoders (e.g. Metaspace): decode the single token
                table.append(tokenizer.decode([i]).encode())
        return cls(table)

    def find(self, response_ids: Sequence[int]) -> ResponseParts:
        """Parts of one response (its real tokens only, no padding)."""
        ids = np.asarray(response_ids, dtype=np.int64)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= len(self.token_bytes):
            return ResponseParts(False)
        text = b"".join(self.token_bytes[i] for i in ids.tolist())
        ends = np.cumsum(self.lengths[ids])  # byte offset one past each token
        body = text.rstrip()
        stripped = True
        while stripped:  # end-of-turn tokens that a tokenizer does not mark special
            stripped = False
            for tail in _END_TEXT:
                if body.endswith(tail):
                    body, stripped = body[: -len(tail)].rstrip(), True
        if any(body.count(b"<%s>" % t) != 1 or body.count(b"</%s>" % t) != 1 for t in _TAGS):
            return ResponseParts(False)
        match = _LAYOUT.fullmatch(body)
        if match is None or not all(g.strip() for g in match.groups()):
            return ResponseParts(False)

        def token_at(byte: int) -> int:
            return int(np.searchsorted(ends, byte, side="right"))

        return ResponseParts(True, token_at(match.end(1) + len(b"</caption>") - 1),
                             token_at(match.end(3) + len(b"</answer>") - 1))
