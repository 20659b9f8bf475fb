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
