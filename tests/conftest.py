"""Suite-wide set-up: CPU machines run GPU-marked tests as skips and Triton in interpreter mode.

``TRITON_INTERPRET`` must be set before triton is first imported, which is why it is done at
conftest import time (pytest imports this file before collecting any test module).
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Turn every ``@pytest.mark.gpu`` test into a skip with a reason when there is no GPU."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# Tiny random Qwen3-VL directories (variants "a" and "b" of megatron_prism.models.qwen3vl.tiny),
# built once per session, and the transformers models loaded from them (the parity oracle).
@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    from megatron_prism.models.qwen3vl.tiny import save_random_qwen3vl

    root = tmp_path_factory.mktemp("tiny_qwen3vl")
    return {v: save_random_qwen3vl(root / v, v, seed=11 + i) for i, v in enumerate("ab")}


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    return {v: _hf_model_class().from_pretrained(d, dtype=torch.float32).eval() for v, d in tiny_dirs.items()}


def _hf_model_class():
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration
