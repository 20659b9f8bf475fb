"""The embedded task's own tiny tokenizer (Hugging Face format), trained on its corpus.

A byte-pair-encoding model over characters (no byte fallback: the printable ASCII characters and
the newline are the base alphabet, so any ASCII text encodes without unknown tokens), with:

* the chat special tokens ``chat.SPECIAL_TOKENS`` as special tokens with the FIXED ids 0..6, in
  that order: ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2, ``<|vision_start|>`` 3,
  ``<|vision_end|>`` 4, ``<|image_pad|>`` 5, ``<|video_pad|>`` 6 (the BPE trainer puts its special
  tokens first; the tiny model config uses 5/6/3/4 as image/video/vision-start/vision-end ids);
* the response tags ``<caption>`` ... ``</answer>`` as ordinary (non-special) added tokens, each one
  id, the last six ids of the vocabulary (they are never split and survive
  ``skip_special_tokens``);
* a pre-tokenizer that isolates every digit (so numbers are read digit by digit and arithmetic is
  learnable), keeps a leading space with the word after it, and a ``Fuse`` decoder, so decoding is
  the exact concatenation of the tokens (exact round trip).

Training is deterministic (checked by the tests across processes). Files are written by hand
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, sorted keys) so their
bytes do not depend on the installed transformers version; ``AutoTokenizer.from_pretrained`` loads
them as a fast tokenizer with ``eos_token="<|im_end|>"``, ``pad_token="<|endoftext|>"`` and the
Qwen-VL chat template ``chat.CHAT_TEMPLATE``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_prism.data.chat import CHAT_TEMPLATE, END_OF_TEXT, IM_END, RESPONSE_TAGS, SPECIAL_TOKENS

TAG_TOKENS = tuple(t for tag in RESPONSE_TAGS for t in (f"<{tag}>", f"</{tag}>"))
BASE_ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]
PRE_TOKEN_PATTERN = r" ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\d|\s+(?!\S)|\s+"
DEFAULT_VOCAB_SIZE = 384
MODEL_MAX_LENGTH = 4096

_ADDED = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, *TAG_TOKENS)))


def special_token_ids() -> dict[str, int]:
    """The fixed ids of the special tokens (their order in ``chat.SPECIAL_TOKENS``)."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A BPE tokenizer trained on ``texts`` (special tokens and tags are cut out before training)."""
    if vocab_size < len(SPECIAL_TOKENS) + len(BASE_ALPHABET):
        raise ValueError(f"vocab_size {vocab_size} is below the base alphabet plus special tokens "
                         f"({len(SPECIAL_TOKENS) + len(BASE_ALPHABET)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=BASE_ALPHABET, show_progress=False)
    pieces = [p for text in texts for p in _ADDED.split(text) if p]
    tok.train_from_iterator(pieces, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids} are not 0..{len(SPECIAL_TOKENS) - 1}")
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Writes the Hugging Face files; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(tok.to_str())
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1, sort_keys=True) + "\n",
                                        encoding="utf-8")
    extra = [t for t in SPECIAL_TOKENS if t not in (IM_END, END_OF_TEXT)]
    special_map = {"eos_token": IM_END, "pad_token": END_OF_TEXT, "additional_special_tokens": extra}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "bos_token": None,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,  # as a released Qwen3-VL tokenizer carries one
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
    }
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def check_tokenizer(tok: Tokenizer, texts: Iterable[str]) -> None:
    """Raises if a text does not round-trip exactly or a special token / tag / digit is not one id."""
    for t in (*SPECIAL_TOKENS, *TAG_TOKENS, *"0123456789"):
        ids = tok.encode(t, add_special_tokens=False).ids
        if len(ids) != 1:
            raise RuntimeError(f"{t!r} encodes to {len(ids)} ids, expected one")
    for text in texts:
        back = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
        if back != text:
            raise RuntimeError(f"round trip changed the text: {text!r} -> {back!r}")
