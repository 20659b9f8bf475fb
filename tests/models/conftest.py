"""Tiny random Qwen3-VL directories shared by the model tests (built once per session)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from megatron_prism.models.qwen3vl.tiny import save_random_qwen3vl


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen3vl")
    return {v: save_random_qwen3vl(root / v, v, seed=11 + i) for i, v in enumerate("ab")}


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    return {v: Qwen3VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval() for v, d in tiny_dirs.items()}
