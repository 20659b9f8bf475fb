"""Our Qwen3-VL input processing against transformers' (image processor and image-token expansion)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from megatron_prism.data import chat
from megatron_prism.data.images import ImageSettings, grid_size, patchify
from megatron_prism.data.processing import IGNORE_INDEX, InputProcessor
from megatron_prism.data.records import ImageRef, Record, RecordError

# Small pixel budgets keep the test fast; the arithmetic is the same as the released defaults.
SETTINGS = ImageSettings(min_pixels=4 * 32 * 32, max_pixels=48 * 32 * 32)


def _hf_processor(s: ImageSettings) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=s.patch_size, merge_size=s.merge_size, temporal_patch_size=s.temporal_patch_size,
        min_pixels=s.min_pixels, max_pixels=s.max_pixels, image_mean=list(s.image_mean), image_std=list(s.image_std),
    )


@pytest.mark.parametrize("size", [(37, 53), (300, 17), (5, 7), (640, 480), (129, 129), (1000, 31), (12, 300)])
def test_pixel_values_match_transformers(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours, grid = patchify(image, SETTINGS)
    ref = _hf_processor(SETTINGS)(images=[image], return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert ours.shape == ref["pixel_values"].shape
    torch.testing.assert_close(ours, ref["pixel_values"].float(), rtol=0, atol=1e-6)


def test_grid_respects_the_pixel_budget():
    s = ImageSettings()  # released defaults: 65536 .. 16777216 pixels, factor 32
    for h, w in [(10, 10), (4000, 3000), (32, 6000)]:
        gh, gw = grid_size(h, w, s)
        assert gh % 32 == 0 and gw % 32 == 0
        assert s.min_pixels <= gh * gw <= s.max_pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        grid_size(1, 500, s)


def _tokenizer() -> PreTrainedTokenizerFast:
    words = ["what", "is", "this", "?", "a", "red", "circle", "<caption>", "</caption>", "<think>", "</think>",
             "<answer>", "</answer>", "4", "system", "user", "assistant", "\n"]
    vocab = {t: i for i, t in enumerate(chat.SPECIAL_TOKENS + ("[UNK]",))}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=r"\s+|(?=[?<])|(?<=[?>])", behavior="removed")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token=chat.END_OF_TEXT,
                                   eos_token=chat.IM_END)
    fast.add_special_tokens({"additional_special_tokens": list(chat.SPECIAL_TOKENS)})
    return fast


def _png(tmp_path, name, size, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / name
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_image_tokens_expand_as_transformers_does(tmp_path):
    """Each image's <|image_pad|> becomes t*h*w/merge^2 pads, in order, as Qwen3VLProcessor does."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tok = _tokenizer()
    paths = [_png(tmp_path, "a.png", (70, 40), 1), _png(tmp_path, "b.png", (33, 97), 2)]
    record = Record(id="r1", images=[ImageRef(path=p) for p in paths], prompt="<image> what is this ? <image>")
    ours = InputProcessor(tok, SETTINGS, system_prompt=None).prompt(record)

    # Qwen3VLProcessor cannot be constructed without torchvision (its video processor), so its
    # replacement rule is called unbound on the objects it reads: image_processor and image_token.
    ref = _hf_processor(SETTINGS)(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    host = SimpleNamespace(image_processor=_hf_processor(SETTINGS), image_token=chat.IMAGE_PAD)
    text = chat.render_prompt(record, system_prompt=None)
    pieces = text.split(chat.IMAGE_PAD)
    expanded = pieces[0] + "".join(
        Qwen3VLProcessor.replace_image_token(host, ref, i) + rest for i, rest in enumerate(pieces[1:])
    )
    assert ours.input_ids.tolist() == tok.encode(expanded, add_special_tokens=False)
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"].float(), rtol=0, atol=1e-6)
    assert ours.image_grid_thw.tolist() == ref["image_grid_thw"].tolist()


def test_demonstration_labels_cover_the_response_only(tmp_path):
    tok = _tokenizer()
    record = Record(id="r2", images=[ImageRef(path=_png(tmp_path, "c.png", (64, 64), 3))],
                    prompt="what is this ?", response=chat.format_response("a red circle", "a", "4"))
    proc = InputProcessor(tok, SETTINGS)
    ex = proc.demonstration(record)
    response_ids = tok.encode(chat.render_response(record.response), add_special_tokens=False)
    assert (ex.labels[: ex.prompt_length] == IGNORE_INDEX).all()
    assert ex.labels[ex.prompt_length:].tolist() == response_ids == ex.input_ids[ex.prompt_length:].tolist()
    assert response_ids[-1] == tok.convert_tokens_to_ids(chat.IM_END)
    pads = int((ex.input_ids == tok.convert_tokens_to_ids(chat.IMAGE_PAD)).sum())
    assert pads == int(ex.image_grid_thw.prod()) // 4

    with pytest.raises(RecordError, match="above the maximum length 10"):
        InputProcessor(tok, SETTINGS, max_length=10).demonstration(record)


def test_corrupt_and_missing_images_name_the_record(tmp_path):
    tok = _tokenizer()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    proc = InputProcessor(tok, SETTINGS)
    with pytest.raises(RecordError, match=r"data.jsonl:7: image .*bad.png cannot be decoded"):
        proc.prompt(Record(id="x", images=[ImageRef(path=bad)], prompt="what", origin="data.jsonl:7"))
    with pytest.raises(RecordError, match="does not exist"):
        proc.prompt(Record(id="y", images=[ImageRef(path=tmp_path / "gone.png")], prompt="what", origin="d:1"))


def _write_preprocessor(folder, **fields):
    import json

    raw = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
           "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "do_resize": True, "do_rescale": True,
           "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 1 / 255,
           "size": {"shortest_edge": 8 * 32 * 32, "longest_edge": 20 * 32 * 32},
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    raw.update(fields)
    (folder / "preprocessor_config.json").write_text(json.dumps(raw))
    return folder


def test_a_model_directory_preprocessor_config_is_read_as_transformers_reads_it(tmp_path):
    """Pixel bounds and mean/std from the model's preprocessor_config.json (Qwen3-VL's layout:
    size.shortest_edge/longest_edge are pixel counts): the same pixels as transformers' own
    AutoImageProcessor loading that directory."""
    from transformers import AutoImageProcessor

    from megatron_prism.data.images import settings_for_model

    _write_preprocessor(tmp_path)
    s = settings_for_model(tmp_path, patch_size=16, merge_size=2, temporal_patch_size=2)
    assert (s.min_pixels, s.max_pixels) == (8 * 32 * 32, 20 * 32 * 32)
    assert s.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    hf = AutoImageProcessor.from_pretrained(str(tmp_path), local_files_only=True)
    rng = np.random.default_rng(3)
    for size in ((37, 53), (640, 480), (12, 300)):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        ours, grid = patchify(image, s)
        ref = hf(images=[image], return_tensors="pt")
        assert list(grid) == ref["image_grid_thw"][0].tolist()
        torch.testing.assert_close(ours, ref["pixel_values"].float(), rtol=0, atol=1e-5)
    # the run's data.min_pixels / max_pixels, when set, override the file's bounds
    s2 = settings_for_model(tmp_path, patch_size=16, merge_size=2, temporal_patch_size=2, max_pixels=10 * 32 * 32)
    assert (s2.min_pixels, s2.max_pixels) == (8 * 32 * 32, 10 * 32 * 32)
    # Qwen2-VL's min_pixels / max_pixels keys; no file at all: the released defaults
    _write_preprocessor(tmp_path, size=None, min_pixels=4096, max_pixels=8192)
    assert settings_for_model(tmp_path, patch_size=16, merge_size=2, temporal_patch_size=2).max_pixels == 8192
    assert settings_for_model(tmp_path / "none", patch_size=14, merge_size=2, temporal_patch_size=2) == \
        ImageSettings(patch_size=14)


def test_a_preprocessor_config_that_disagrees_is_one_clear_error(tmp_path):
    from megatron_prism.data.images import settings_for_model

    _write_preprocessor(tmp_path, patch_size=14)
    with pytest.raises(RecordError, match=r"preprocessor_config.json: patch_size 14 \(config.json: 16\) disagrees"):
        settings_for_model(tmp_path, patch_size=16, merge_size=2, temporal_patch_size=2)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(RecordError, match="not valid JSON"):
        settings_for_model(tmp_path, patch_size=16, merge_size=2, temporal_patch_size=2)
