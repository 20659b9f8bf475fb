"""The Qwen3-VL vision tower, wrapped as a megatron submodule.

We reuse transformers' ``Qwen3VLVisionModel`` (patch embedding, interpolated learned positions,
2-D rotary ViT blocks, patch merger and the DeepStack mergers) rather than re-implementing it: it
is ~0.6B parameters against an 8B language model, it is replicated on every tensor-parallel rank
(as verl and slime do) and it lives on the first pipeline stage only. Its parameters keep their
Hugging Face names under ``vision.model.``, so conversion maps them one-to-one.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class Qwen3VLVisionTower(MegatronModule):
    """pixel patches + grids -> (merged image features, DeepStack features per level)."""

    def __init__(self, config: TransformerConfig, hf_vision_config, attn_implementation: str = "sdpa") -> None:
        super().__init__(config=config)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        hf_vision_config._attn_implementation = attn_implementation
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.model = Qwen3VLVisionModel(hf_vision_config).to(device=device, dtype=config.params_dtype)
        self.spatial_merge_size = hf_vision_config.spatial_merge_size
        self.num_deepstack = len(hf_vision_config.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.model(pixel_values.to(self.model.patch_embed.proj.weight.dtype), grid_thw=grid_thw, return_dict=True)
        return out.pooler_output, list(out.deepstack_features)

