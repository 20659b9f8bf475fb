"""Command-line faces of the conversions (tools/ and `prism convert` call these)."""

from __future__ import annotations

import argparse
import sys

from megatron_prism.config.validate import positive_int
from megatron_prism.models.errors import CheckpointError


def _run(fn, *args) -> int:
    try:
        out = fn(*args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def hf_to_megatron_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a Hugging Face Qwen3-VL directory to a megatron_prism checkpoint.")
    parser.add_argument("--hf-dir", required=True, help="HF directory with config.json and safetensors")
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    args = parser.parse_args(argv)
    from megatron_prism.models.conversion.convert import convert_hf_to_megatron

    return _run(convert_hf_to_megatron, args.hf_dir, args.out, args.tp, args.pp)


def megatron_to_hf_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a megatron_prism checkpoint to a Hugging Face Qwen3-VL directory.")
    parser.add_argument("--megatron-dir", required=True, help="megatron_prism checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
    args = parser.parse_args(argv)
    from megatron_prism.models.conversion.convert import convert_megatron_to_hf

    return _run(convert_megatron_to_hf, args.megatron_dir, args.out)
