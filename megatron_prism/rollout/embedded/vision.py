"""The embedded engine's CPU float32 path for transformers' ``Qwen3VLVisionModel``.

Why: on CPU at rollout sizes the vision tower is bound by the number of kernels and module
calls, not by FLOPs (profiled in tools/bench_rollout.py at batch 16: ~10 % of ``generate``,
most of it HF's per-image attention loop -- one SDPA call per image per block -- the Conv3d patch
embedding and the module/decorator overhead). This computes the same maths on the HF module's own
parameters (read at call time, so ``update_weights`` / release / resume need nothing here):

- the patch embedding's Conv3d (kernel == stride) as one matmul over the flattened patches;
- attention over *all* images of the call at once, block-diagonal by an additive mask (images,
  and an image's temporal frames, never attend to each other, as in HF's ``cu_seqlens`` split),
  up to :data:`JOINT_MAX` patches; beyond that (the mask grows quadratically) per frame, as HF does;
- ``rotate_half`` as a roll times a signed sine table (one fused ``addcmul``).

The grid-derived tables (position-embedding interpolation taps, rotary angles, ``cu_seqlens``) come
from transformers' own helpers, so they are HF's by construction. Rounding differs from HF's order at
the float32 ulp level (greedy tokens equal to ``generate``: tests/rollout/test_embedded_engine.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest patch count of one call attended jointly (mask of JOINT_MAX^2 floats: 4 MiB).
JOINT_MAX = 1024
# Image grids whose weight-independent tables are kept (oldest dropped first).
CACHE_GRIDS = 256


class VisionTower:
    """Calls like the HF module with ``return_dict=True`` would be used here: ``(pixels, grid_thw)``
    -> ``(merged features [N / merge^2, out], DeepStack features list)``."""

    def __init__(self, visual: torch.nn.Module) -> None:
        self.v = visual
        cfg = visual.config
        self.heads = cfg.num_heads
        self.merge = cfg.spatial_merge_size
        self.deepstack_index = {layer: i for i, layer in enumerate(cfg.deepstack_visual_indexes)}
        self._cache: dict = {}

    def _image_tables(self, thw: tuple[int, int, int], device: torch.device, dtype: torch.dtype):
        """One image's position-embedding taps and weights and its rotary cos / signed sin: they
        depend on its grid only (not on weights), so they are kept per grid (image sizes recur:
        processors resize to a few buckets) -- HF's helpers cost ~0.1 ms per image."""
        key = (thw, device, dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

        v = self.v
        grid = torch.tensor([thw], dtype=torch.long, device=device)
        idx, w = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=v.num_grid_per_side, mode=v.interpolation_mode,
            align_corners=v.interpolation_align_corners, spatial_merge_size=self.merge, kwargs={})
        cos, sin = v.rotary_pos_emb(w, get_vision_position_ids(grid, self.merge, kwargs={}))  # [N, hd] float32
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        if len(self._cache) >= CACHE_GRIDS:
            self._cache.pop(next(iter(self._cache)))
        hit = self._cache[key] = (idx, w.to(dtype), cos.to(dtype), sin.to(dtype))
        return hit

    def _tables(self, grid: Tensor, dtype: torch.dtype):
        per_image = [self._image_tables(tuple(g), grid.device, dtype) for g in grid.tolist()]
        idx, w, cos, sin = (torch.cat(t) if len(per_image) > 1 else t[0] for t in zip(*per_image))
        cu = [0]  # attention sequences: each temporal frame of each image (HF's get_vision_cu_seqlens)
        for frames, height, width in grid.tolist():
            for _ in range(frames):
                cu.append(cu[-1] + height * width)
        return idx, w, cos[:, None], sin[:, None], cu

    def __call__(self, pixels: Tensor, grid: Tensor) -> tuple[Tensor, list[Tensor]]:
        v = self.v
        proj = v.patch_embed.proj
        interp_idx, interp_w, cos, sin, cu = self._tables(grid, pixels.dtype)
        n = pixels.shape[0]
        # Conv3d with kernel == stride over one patch each == a matmul with the flattened kernel
        x = torch.addmm(proj.bias, pixels.reshape(n, -1), proj.weight.reshape(proj.weight.shape[0], -1).t())
        x = x + (v.pos_embed(interp_idx) * interp_w[:, :, None]).sum(1)
        c = x.shape[-1]
        hd = c // self.heads
        bias = None
        if n <= JOINT_MAX and len(cu) > 2:
            bias = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device)
            for a, b in zip(cu[:-1], cu[1:]):
                bias[a:b, a:b] = 0.0
        deepstack = []
        for layer, blk in enumerate(v.blocks):
            attn = blk.attn
            h = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
            qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(n, 3, self.heads, hd)
            qk = qkv[:, :2]
            qk = torch.addcmul(qk * cos[:, None], qk.roll(hd // 2, -1), sin[:, None])
            q, k = qk.permute(1, 2, 0, 3).unbind(0)  # [heads, N, hd]
            val = qkv[:, 2].transpose(0, 1)
            if bias is not None:  # written out: SDPA's CPU path checks a float mask (all/where) at ~1 ms a call
                o = torch.bmm(torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=attn.scaling), -1), val)
            elif len(cu) == 2:
                o = F.scaled_dot_product_attention(q, k, val, scale=attn.scaling)
            else:  # per frame, as HF's non-flash path
                o = torch.cat([F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], val[:, a:b], scale=attn.scaling)
                               for a, b in zip(cu[:-1], cu[1:])], dim=1)
            x = x + F.linear(o.transpose(0, 1).reshape(n, c), attn.proj.weight, attn.proj.bias)
            mlp = blk.mlp
            h = F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
            h = mlp.act_fn(F.linear(h, mlp.linear_fc1.weight, mlp.linear_fc1.bias))
            x = x + F.linear(h, mlp.linear_fc2.weight, mlp.linear_fc2.bias)
            if layer in self.deepstack_index:
                deepstack.append(_merge(v.deepstack_merger_list[self.deepstack_index[layer]], x))
        return _merge(v.merger, x), deepstack


def _merge(merger: torch.nn.Module, x: Tensor) -> Tensor:
    """``Qwen3VLVisionPatchMerger.forward``: LayerNorm before (or, post-shuffle, after) grouping
    each ``merge x merge`` block of patches into one row, then fc1 -> GELU -> fc2."""
    hs = merger.hidden_size
    norm = merger.norm
    if merger.use_postshuffle_norm:
        x = F.layer_norm(x.reshape(-1, hs), (hs,), norm.weight, norm.bias, norm.eps)
    else:
        x = F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps).reshape(-1, hs)
    x = merger.act_fn(F.linear(x, merger.linear_fc1.weight, merger.linear_fc1.bias))
    return F.linear(x, merger.linear_fc2.weight, merger.linear_fc2.bias)
