"""The megatron policy reproduces transformers' Qwen3-VL logits (TP=1, plain Python process).

Tolerance: relative max error of the logits <= 1e-4 in fp32 (observed: exact).
"""

from __future__ import annotations

import pytest
import torch
from cases import IMG, hf_logits, relative_error, standard_cases

from megatron_prism.models import build_policy

TOL = 1e-4


@pytest.mark.parametrize("variant", ["a", "b"])
def test_logits_match_transformers(variant, tiny_dirs, hf_models):
    model = build_policy(tiny_dirs[variant]).eval()
    for name, case in standard_cases(seed=100).items():
        with torch.no_grad():
            out = model(
                case["input_ids"], pixel_values=case.get("pixel_values"),
                image_grid_thw=case.get("image_grid_thw"), attention_mask=case.get("attention_mask"),
            )
        ref = hf_logits(hf_models[variant], case)
        assert out.shape == ref.shape, name
        assert relative_error(out, ref, case) <= TOL, name


def test_hidden_states_match_transformers(tiny_dirs, hf_models):
    model = build_policy(tiny_dirs["a"]).eval()
    case = standard_cases(seed=5)["padded_batch"]
    kwargs = {k: case[k] for k in ("pixel_values", "image_grid_thw", "attention_mask")}
    with torch.no_grad():
        hidden = model(case["input_ids"], return_hidden=True, **kwargs)
        ref = hf_models["a"].model(
            input_ids=case["input_ids"], mm_token_type_ids=(case["input_ids"] == IMG).int(), **kwargs
        ).last_hidden_state
    assert hidden.shape == ref.shape
    assert relative_error(hidden, ref, case) <= TOL


def test_unseen_directory(tmp_path):
    """A Qwen3-VL directory made here with another seed and dtype-cast weights (bf16 on disk)."""
    from transformers import Qwen3VLForConditionalGeneration

    from megatron_prism.models.qwen3vl.tiny import save_random_qwen3vl

    path = save_random_qwen3vl(tmp_path / "fresh", "b", seed=12345, dtype=torch.bfloat16)
    hf = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model = build_policy(path).eval()
    case = standard_cases(seed=9)["two_images"]
    with torch.no_grad():
        out = model(case["input_ids"], pixel_values=case["pixel_values"], image_grid_thw=case["image_grid_thw"])
    assert relative_error(out, hf_logits(hf, case), case) <= TOL


def test_placeholder_count_mismatch_is_an_error(tiny_dirs):
    model = build_policy(tiny_dirs["a"]).eval()
    case = standard_cases(seed=1)["one_image"]
    with pytest.raises(ValueError, match="placeholder"):
        model(case["input_ids"], pixel_values=case["pixel_values"][:8], image_grid_thw=torch.tensor([[1, 2, 4]]))
