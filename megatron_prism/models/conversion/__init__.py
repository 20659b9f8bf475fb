"""HF <-> Megatron conversion for Qwen3-VL: one name/shape map (mapping.py), the project's
reshardable checkpoint format (megatron_format.py), and the two conversions (convert.py)."""

from megatron_prism.models.conversion.convert import (
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    layout_maps,
    open_source,
)

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf", "layout_maps", "open_source"]
