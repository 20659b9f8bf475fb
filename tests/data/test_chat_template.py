"""Our chat rendering (data/chat.py, no Jinja) equals the tokenizer's ``apply_chat_template`` with a
Qwen-VL chat template, on text, image and multi-turn prompts and on whole demonstrations.

The tokenizer is built here, locally (the embedded task's BPE trainer on a small corpus, saved with
its template as a model directory would carry it); nothing comes from a hub. ``CHAT_TEMPLATE``
follows the non-tool branch of the released Qwen3-VL-Instruct template: the system turn as given,
user content as text or parts (an image part is ``<|vision_start|><|image_pad|><|vision_end|>``),
``<|im_start|>assistant\\n`` as the generation prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from megatron_prism.data import chat
from megatron_prism.data.records import ImageRef, Record
from megatron_prism.data.synth.tokenizer import save_tokenizer, train_tokenizer

CORPUS = ["What is shown in the picture? Count the red squares.", "There are 3 of them.",
          "<caption>two bars</caption><think>3 + 4 = 7</think><answer>7</answer>", "Be brief and exact."] * 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = save_tokenizer(train_tokenizer(CORPUS, vocab_size=160), tmp_path_factory.mktemp("tok"))
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok.chat_template == chat.CHAT_TEMPLATE
    return tok


def _images(n: int, tmp: Path) -> list[ImageRef]:
    Image.new("RGB", (4, 4)).save(tmp / "i.png")
    return [ImageRef(path=tmp / "i.png") for _ in range(n)]


def _records(tmp: Path) -> dict[str, Record]:
    return {
        "text": Record("t", prompt="Count the red squares.", response="<answer>3</answer>"),
        "images first": Record("i", images=_images(2, tmp), prompt="What is shown?", response="<answer>7</answer>"),
        "markers inside": Record("m", images=_images(2, tmp), prompt="Left <image> and right <image>: which?",
                                 response="left"),
        "multi-turn, own system": Record("mt", images=_images(1, tmp), messages=[
            {"role": "system", "content": "Be brief and exact."},
            {"role": "user", "content": "<image>What is shown?"}, {"role": "assistant", "content": "Bars."},
            {"role": "user", "content": "How many?"}], response="<answer>2</answer>"),
        "image in a later turn": Record("lt", images=_images(1, tmp), messages=[
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Now this: <image> count them."},
            {"role": "assistant", "content": "<answer>4</answer>"}]),
    }


@pytest.mark.parametrize("case", ["text", "images first", "markers inside", "multi-turn, own system",
                                  "image in a later turn"])
def test_rendering_equals_apply_chat_template(tokenizer, tmp_path, case):
    record = _records(tmp_path)[case]
    messages = chat.template_messages(record)
    ours = chat.render_prompt(record)
    assert ours == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tokenizer.encode(ours, add_special_tokens=False) == list(ids)
    # the whole demonstration: prompt, response and its end-of-turn token (the template adds a newline)
    full = tokenizer.apply_chat_template(chat.template_messages(record, with_response=True), tokenize=False)
    assert ours + chat.render_response(chat.demonstration(record)) + "\n" == full
    assert ours.count(chat.IMAGE_PAD) == len(record.images)


def test_the_layout_written_out(tmp_path):
    """One case spelt out by hand, as Qwen's documentation shows the Qwen-VL prompt."""
    record = Record("x", images=_images(1, tmp_path), prompt="Describe this image.")
    assert chat.render_prompt(record, system_prompt="You are a helpful assistant.") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\n")
