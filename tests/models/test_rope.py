"""3-D MRoPE position ids and rotary angles against transformers' Qwen3-VL (the oracle)."""

from __future__ import annotations

import pytest
import torch
from cases import IMG, make_case
from transformers import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLTextRotaryEmbedding

from megatron_prism.models.qwen3vl.rope import InterleavedMRoPE, mrope_position_ids
from megatron_prism.models.qwen3vl.tiny import TOKENS, tiny_qwen3vl_config

VID = TOKENS["video_token_id"]


@pytest.fixture(scope="module")
def hf_model():
    with torch.device("meta"):
        return Qwen3VLModel(tiny_qwen3vl_config("a"))


def _ours(case, video_grid=None):
    return mrope_position_ids(
        case["input_ids"], case.get("image_grid_thw"), video_grid, case.get("attention_mask"),
        image_token_id=TOKENS["image_token_id"], video_token_id=VID, spatial_merge_size=2,
    )


def _theirs(hf_model, case, video_grid=None):
    ids = case["input_ids"]
    types = (ids == IMG).int() + 2 * (ids == VID).int()
    return hf_model.get_rope_index(
        ids, types, image_grid_thw=case.get("image_grid_thw"),
        video_grid_thw=video_grid, attention_mask=case.get("attention_mask"),
    )


@pytest.mark.parametrize(
    "grids,pad",
    [
        ([[]], "left"),
        ([[[1, 4, 4]]], "left"),
        ([[[1, 4, 4], [1, 6, 2]]], "left"),
        ([[[1, 2, 8]], [[1, 4, 4], [1, 2, 2]], []], "left"),
        ([[[1, 2, 8]], [[1, 4, 4], [1, 2, 2]], []], "right"),
        ([[[2, 4, 4]]], "left"),  # an image grid with two temporal patches
    ],
)
def test_position_ids_match_transformers(hf_model, grids, pad):
    case = make_case(grids, seed=7, pad_side=pad)
    ours, our_delta = _ours(case)
    theirs, their_delta = _theirs(hf_model, case)
    assert torch.equal(ours, theirs)
    assert torch.equal(our_delta.view(-1), their_delta.view(-1))


def test_video_frames_are_separate_grids(hf_model):
    # A 3-frame video: the processor puts a timestamp (text) between frames, each frame its own run.
    ids = [5, 6, TOKENS["vision_start_token_id"]]
    for frame in range(3):
        ids += [30 + frame] + [VID] * 4 + [40]
    ids += [TOKENS["vision_end_token_id"], 7]
    case = {"input_ids": torch.tensor([ids])}
    video = torch.tensor([[3, 4, 4]])
    ours, _ = _ours(case, video)
    theirs, _ = _theirs(hf_model, case, video.clone())
    assert torch.equal(ours, theirs)


def test_mismatched_grids_are_reported():
    case = make_case([[[1, 4, 4]]], seed=1)
    with pytest.raises(ValueError, match="grids were given but only 1"):
        mrope_position_ids(case["input_ids"], torch.tensor([[1, 4, 4], [1, 2, 2]]), None, None,
                           image_token_id=IMG, video_token_id=VID, spatial_merge_size=2)
    with pytest.raises(ValueError, match="more image placeholder tokens"):
        mrope_position_ids(case["input_ids"], torch.zeros(0, 3, dtype=torch.long), None, None,
                           image_token_id=IMG, video_token_id=VID, spatial_merge_size=2)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_rotary_angles_match_transformers(variant):
    cfg: Qwen3VLConfig = tiny_qwen3vl_config(variant)
    tc = cfg.text_config
    theirs_mod = Qwen3VLTextRotaryEmbedding(tc)
    ours_mod = InterleavedMRoPE(tc.head_dim, tc.rope_parameters["rope_theta"], tc.rope_parameters["mrope_section"])
    gen = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 500, (3, 2, 9), generator=gen)
    cos, sin = theirs_mod(torch.zeros(1, dtype=torch.float32), positions)  # [b, s, d]
    emb = ours_mod(positions)  # [s, b, 1, d]
    assert emb.shape == (9, 2, 1, tc.head_dim)
    torch.testing.assert_close(emb.squeeze(2).transpose(0, 1).cos(), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.squeeze(2).transpose(0, 1).sin(), sin, rtol=0, atol=1e-6)
