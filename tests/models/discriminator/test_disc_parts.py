"""Part boundaries from token ids (a byte-level BPE whose merges split and join tags), validity,
batched positions against a hand-built two-image example, and isolated parts == PRISM's two
separate forwards."""

from __future__ import annotations

import pytest
import torch
from disc_cases import CAP_, IMG, REPO, VISION, batch, items, tiny_finder

from megatron_prism.models.discriminator import PartFinder, ScoreItem, build_discriminator, make_score_batch
from megatron_prism.models.discriminator.router import CAPTION, PAD, PROMPT, REASONING
from megatron_prism.models.qwen3vl.rope import mrope_position_ids
from megatron_prism.rewards.simple import check_format

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE (Qwen's kind) with merges that put '><' in one token and split tag names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_prism.models.discriminator.parts import _byte_level_decoder

    alphabet = sorted(_byte_level_decoder(), key=lambda c: _byte_level_decoder()[c])
    merges = [("<", "/"), (">", "<"), ("c", "a"), ("ca", "p"), ("t", "i"), ("ti", "o"), ("tio", "n"),
              ("cap", "tion"), ("a", "n"), ("an", "s"), ("Ġ", "c")]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    return fast


def _oracle_end(tokenizer, ids: list[int], text: str, tag: str) -> int:
    """Independent: token whose single-token decode covers the last character of ``tag`` (ASCII text)."""
    target = text.index(tag) + len(tag) - 1
    pos = 0
    for k, i in enumerate(ids):
        pos += len(tokenizer.decode([i], skip_special_tokens=True))
        if pos > target:
            return k
    raise AssertionError("tag not covered")


RESPONSES = [
    ("<caption>a cat é</caption><think>2+2=4</think><answer>4</answer><|im_end|>", True),
    ("  <caption>x</caption>\n<think>y</think> <answer>z</answer>\n", True),
    ("<caption>a</caption><think>b</think><answer>c</answer> extra", False),
    ("<think>b</think><caption>a</caption><answer>c</answer>", False),
    ("<caption>a</caption><think>b<answer>c</answer>", False),
    ("<caption> </caption><think>b</think><answer>c</answer>", False),
    ("<caption>a<caption></caption><think>b</think><answer>c</answer>", False),
    ("", False),
]


@pytest.mark.parametrize("text,valid", RESPONSES)
def test_part_ends_from_token_ids(tokenizer, text, valid):
    finder = PartFinder.from_tokenizer(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    parts = finder.find(ids)
    assert parts.valid == valid == check_format(text)
    if valid:
        ascii_text = text.replace("é", "e")  # the oracle decodes token by token; é is 2 bytes in 1+ tokens
        if "é" not in text:
            assert parts.caption_end == _oracle_end(tokenizer, ids, ascii_text, "</caption>")
            assert parts.answer_end == _oracle_end(tokenizer, ids, ascii_text, "</answer>")
        assert tokenizer.decode(ids[: parts.caption_end + 1]).rstrip().endswith("</caption>") or \
            tokenizer.convert_ids_to_tokens(ids[parts.caption_end]) == "><"
        assert tokenizer.decode(ids[: parts.answer_end + 1]).endswith("</answer>")
    if text.startswith("<caption>a cat"):
        assert tokenizer.convert_ids_to_tokens(ids[parts.caption_end]) == "><"  # the tag shares its last token


def test_hand_built_batch_with_two_images_padding_and_a_malformed_row():
    rows = items(seed=0)
    b = make_score_batch(rows, tiny_finder(), VISION, pad_id=0, multiple_of=4, isolate_parts=False)
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rows]
    assert b.input_ids.shape == (4, -(-max(lengths) // 4) * 4)
    assert b.valid.tolist() == [True, True, True, False]
    for i, row in enumerate(rows):
        p, r = len(row.prompt_ids), list(row.response_ids)
        assert b.attention_mask[i].sum() == lengths[i] and b.response_start[i] == p
        if i < 3:  # layout of disc_cases.response: <caption> w.. </caption> ' ' <think> ... </answer> <|im_end|>
            cap_end, ans_end = p + r.index(CAP_), p + len(r) - 2
            assert b.score_positions[i].tolist() == [cap_end, ans_end]
            labels = b.part_labels[i]
            assert (labels[:p] == PROMPT).all() and (labels[p: cap_end + 1] == CAPTION).all()
            assert (labels[cap_end + 1: ans_end + 1] == REASONING).all() and labels[ans_end + 1] == PROMPT
        else:
            assert b.score_positions[i].tolist() == [lengths[i] - 1] * 2
        assert (b.part_labels[i, lengths[i]:] == PAD).all()
    assert int((b.input_ids == IMG).sum()) == int(b.image_grid_thw.prod(-1).sum()) // 4 == (16 + 12 + 8 + 4) // 4
    # Positions are the policy's 3-D MRoPE ids (mrope_position_ids is tested against transformers).
    ref, _ = mrope_position_ids(b.input_ids, b.image_grid_thw, None, b.attention_mask,
                                image_token_id=IMG, video_token_id=VISION.video_token_id, spatial_merge_size=2)
    assert torch.equal(b.position_ids, ref)
    first_image = (b.input_ids[0] == IMG).nonzero()[0, 0]
    assert b.position_ids[:, 0, first_image].tolist() == [first_image.item()] * 3  # t, h, w start together
    assert b.position_ids[1, 0, first_image + 2].item() == first_image.item() + 1  # next row of a 2x2-merged 4x4 grid


def test_isolated_parts_equal_prism_separate_forwards(disc_ckpt):
    """One forward with isolated parts == PRISM's two forwards (prompt + caption, prompt + think/answer)."""
    rows = items(seed=7)[:3]
    finder = tiny_finder()
    model = build_discriminator(disc_ckpt, head_dropout=0.0, router_jitter=0.0).eval()
    shared = make_score_batch(rows, finder, VISION, pad_id=0)
    with torch.no_grad():
        scores = model(shared.input_ids, **shared.model_inputs())
    for i, row in enumerate(rows):
        r = list(row.response_ids)
        cut = finder.find(r).caption_end + 1
        for part, resp in ((0, r[:cut]), (1, r[cut:])):
            single = ScoreItem(row.prompt_ids, resp, row.pixel_values, row.image_grid_thw)
            b = make_score_batch([single], finder, VISION, pad_id=0, isolate_parts=False)
            pos = len(row.prompt_ids) + len(resp) - (1 if part == 0 else 2)  # </caption>, or </answer> before <|im_end|>
            with torch.no_grad():
                hidden = model(b.input_ids, b.pixel_values, b.image_grid_thw, b.attention_mask,
                               position_ids=b.position_ids, part_labels=b.part_labels,
                               score_positions=torch.tensor([[pos, pos]]))
            assert abs(float(hidden[0, 0]) - float(scores[i, part])) <= 1e-5 * max(1.0, abs(float(hidden[0, 0])))
    # Without isolation the reasoning score reads the caption too, so it differs.
    joint = make_score_batch(rows, finder, VISION, pad_id=0, isolate_parts=False)
    with torch.no_grad():
        other = model(joint.input_ids, **joint.model_inputs())
    assert torch.allclose(other[:, 0], scores[:, 0], atol=1e-5) and not torch.allclose(other[:, 1], scores[:, 1])


@pytest.mark.parametrize("mode", ["routed", "dedicated"])
def test_batched_scores_equal_one_pair_at_a_time(disc_ckpt, mode):
    """Scoring in micro-batches (rows of different lengths and images right-padded together) gives
    each row the score it gets alone, to float32 rounding (1e-5 of the score's magnitude): padding
    sits after every score position (causal), and top-k routing is per token with no capacity limit."""
    rows = items(seed=3) + items(seed=4)  # 8 rows: images of different grids, text only, malformed ones
    finder = tiny_finder()
    model = build_discriminator(disc_ckpt, mode=mode, head_dropout=0.0, router_jitter=0.0).eval()
    together = make_score_batch(rows, finder, VISION, pad_id=0)
    with torch.no_grad():
        batched = model(together.input_ids, **together.model_inputs())
        alone = torch.cat([model(b.input_ids, **b.model_inputs()) for b in
                           (make_score_batch([r], finder, VISION, pad_id=0) for r in rows)])
    valid = together.valid
    assert valid.sum() == 6 and batched.dtype == torch.float32
    torch.testing.assert_close(batched[valid], alone[valid], rtol=1e-5, atol=1e-5 * float(alone.abs().max()))


def test_pairs_per_micro_batch_divides_a_ranks_pairs():
    from megatron_prism.config import load_config
    from megatron_prism.stages.discriminator_common import pairs_per_micro_batch

    tiny = load_config(REPO / "examples" / "configs" / "tiny.yaml", [])
    assert tiny.discriminator.micro_batch_pairs == 16
    assert [pairs_per_micro_batch(tiny, n) for n in (64, 16, 48, 40, 7, 3)] == [16, 16, 16, 10, 7, 3]
    policy_mbs = load_config(REPO / "examples" / "configs" / "tiny.yaml",
                             ["discriminator.micro_batch_pairs=null", "parallel.micro_batch_size=4"])
    assert pairs_per_micro_batch(policy_mbs, 64) == 4
