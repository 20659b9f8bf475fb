"""Packaging for megatron_prism (plain setuptools; there is deliberately no pyproject.toml).

``pip install -e .`` needs torch to be installed *first* on a CPU machine: ``torch>=2.6`` below is
satisfied by an installed torch, but with none installed pip would fetch the newest CUDA build (GBs).
``examples/run_prism_tiny.sh`` and ``tests/run.sh`` do this in the right order.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

_version = re.search(
    r'^__version__ = "([^"]+)"', (Path(__file__).parent / "megatron_prism" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="megatron_prism",
    version=_version,
    description="PRISM post-training (SFT, on-policy distillation, RLVR) for Qwen3-VL on megatron-core",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_prism*", "kernels*"]),
    python_requires=">=3.11",  # sglang 0.5.23 needs >= 3.11; vllm 0.33.0 supports < 3.15
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",
        "transformers>=5.0,<5.25",  # 5.25 requires HF `kernels`, whose import name our kernels/ shadows
        "triton>=3.0",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "pyyaml>=6",
        "tqdm",
        "tensorboard",
        "matplotlib",  # the run's curves (report.md, prism plot)
        "tokenizers>=0.20",
        "pyarrow>=14",
        "math-verify[antlr4_13_2]>=0.7",
    ],
    extras_require={
        # scipy: reference for the t-distribution tail; wandb: the W&B logger is tested offline
        "test": ["pytest", "pytest-timeout", "scipy", "wandb"],
        # GPU runs (README "On a GPU cluster"). One rollout engine per environment: each extra pins
        # the release the adapter was written against and the torch / transformers that release
        # itself pins (its own metadata), so pip cannot pick a combination nobody tested.
        # flash-attn is not listed: nothing here imports it, and its wheel overwrites the
        # flash_attn/cute package that sglang's flash-attn-4 provides. apex is not listed either:
        # where wanted it is built from source against the installed torch/CUDA (its PyPI name is
        # an unrelated package).
        "sglang": ["sglang==0.5.23", "torch==2.14.1", "transformers==5.19.0"],
        "vllm": ["vllm==0.33.0", "torch==2.14.0", "transformers>=5.16.1,<5.21"],
        # Transformer Engine, as megatron-core 0.16.1's own metadata asks (its "dev" extra); it
        # compiles against the installed torch: pip install --no-build-isolation -e '.[te]'
        "te": ["transformer-engine[pytorch]>=2.9,<2.12"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["prism=megatron_prism.cli:main"]},
)
