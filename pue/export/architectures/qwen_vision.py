"""The Qwen-VL vision towers (2, 2.5, 3) over a batch of same-size tiles, with the grid's constants in the graph.

HF's tower takes every image's patches concatenated (`[total_patches, patch_dim]`) plus `grid_thw`, and splits
attention per image (and per window in Qwen2.5-VL) over `cu_seqlens` with a data-dependent `torch.split`: dynamo
cannot export it, and a TorchScript trace would freeze the dummy batch's split. For a fixed tile every image has
the same grid, so this wrapper runs the tower's own blocks (their norms, `qkv`, `proj`, MLP: weights shared, not
copied) on `[batch, patches, dim]` with attention batched per image. What depends on the grid alone is computed
once by HF's own functions and stored as constants: the 2-D rotary table, Qwen2.5-VL's window order and its
block-diagonal window mask, the order the merger's output is put back in, and Qwen3-VL's bilinear taps that
resample its learned position table to the grid (the table itself stays a weight the graph gathers from).

Qwen3-VL's DeepStack: the outputs of the blocks in `deepstack_visual_indexes`, each through its own merger, are a
second output `[batch, tokens, levels, hidden]` (`deepstack_features`), level i for decoder layer i.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class QwenVisionTower(nn.Module):
    """pixel_values [batch, patches, patch_dim] → image_features [batch, patches / merge², hidden] (fp32), and with
    DeepStack (Qwen3-VL) also deepstack_features [batch, patches / merge², levels, hidden]."""

    def __init__(self, visual: nn.Module, grid_thw: tuple[int, int, int]) -> None:
        super().__init__()
        from transformers.vision_utils import (
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
            get_vision_window_index,
        )

        self.visual = visual
        self.merge_unit = int(visual.spatial_merge_size) ** 2
        grid = torch.tensor([list(grid_thw)], dtype=torch.int64)
        patches = int(grid_thw[0] * grid_thw[1] * grid_thw[2])
        anchor = next(visual.parameters())
        positions = get_vision_position_ids(grid, int(visual.spatial_merge_size)).to(anchor.device)
        cos, sin = visual.rotary_pos_emb(torch.zeros(1, device=anchor.device), positions)
        order = torch.arange(patches // self.merge_unit)
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        window_mask = torch.zeros(patches, patches)
        if self.windowed:  # Qwen2.5-VL: tokens regrouped window by window; most blocks attend within a window
            order, cu_windows = get_vision_window_index(
                grid, int(visual.spatial_merge_size), int(visual.window_size), int(visual.patch_size)
            )
            window_of = torch.repeat_interleave(
                torch.arange(len(cu_windows) - 1), (cu_windows[1:] - cu_windows[:-1]).to(torch.int64)
            )
            same = window_of[:, None] == window_of[None, :]
            window_mask = torch.where(same, 0.0, torch.finfo(torch.float32).min)
            cos, sin = (t.reshape(-1, self.merge_unit, t.shape[-1])[order].reshape(patches, -1) for t in (cos, sin))
        self.full_attention = {int(i) for i in getattr(visual, "fullatt_block_indexes", range(len(visual.blocks)))}
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)
        self.register_buffer("window_order", order.to(torch.int64), persistent=False)
        self.register_buffer("restore_order", torch.argsort(order).to(torch.int64), persistent=False)
        self.register_buffer("window_mask", window_mask.to(anchor.device), persistent=False)
        self.learned_positions = hasattr(visual, "pos_embed")
        if self.learned_positions:  # Qwen3-VL: the learned square table resampled to this grid, in merge-block order
            taps, weights = get_vision_interpolation_indices_and_weights(
                grid,
                num_grid_per_side=int(visual.num_grid_per_side),
                mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners,
                spatial_merge_size=int(visual.spatial_merge_size),
            )
            self.register_buffer("position_taps", taps.to(anchor.device), persistent=False)
            self.register_buffer("position_weights", weights.float().to(anchor.device), persistent=False)
        self.deepstack_blocks = [int(i) for i in getattr(visual, "deepstack_visual_indexes", None) or ()]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, patches, patch_dim = pixel_values.shape
        visual = self.visual
        dtype = next(visual.parameters()).dtype
        hidden = visual.patch_embed(pixel_values.reshape(batch * patches, patch_dim).to(dtype))
        hidden = hidden.reshape(batch, patches, hidden.shape[-1])
        if self.learned_positions:
            table = (visual.pos_embed(self.position_taps) * self.position_weights[:, :, None].to(dtype)).sum(1)
            hidden = hidden + table.to(hidden.dtype)
        if self.windowed:
            units = hidden.reshape(batch, patches // self.merge_unit, self.merge_unit, hidden.shape[-1])
            hidden = units[:, self.window_order].reshape(batch, patches, -1)
        levels = []
        for index, block in enumerate(visual.blocks):
            mask = None if index in self.full_attention else self.window_mask
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if index in self.deepstack_blocks:
                merger = visual.deepstack_merger_list[self.deepstack_blocks.index(index)]
                levels.append(self._merge(merger, hidden))
        merged = self._merge(visual.merger, hidden)
        if not self.deepstack_blocks:
            return merged
        return merged, torch.stack(levels, dim=2)

    def _merge(self, merger: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """A patch merger over [batch, patches, dim] → [batch, tokens, hidden] fp32, in the model's token order."""
        batch, patches, dim = hidden.shape
        merged = merger(hidden.reshape(batch * patches, dim))
        merged = merged.reshape(batch, patches // self.merge_unit, merged.shape[-1])
        if self.windowed:
            merged = merged[:, self.restore_order]
        return merged.to(torch.float32)

    def _attention(self, attention: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """HF's vision attention (rotary on q and k in float32, eager softmax in float32) batched per image."""
        batch, patches, dim = hidden.shape
        heads = int(attention.num_heads)
        qkv = attention.qkv(hidden).reshape(batch, patches, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]  # [batch, heads, patches, head_dim]
        cos, sin = self.cos, self.sin
        query = (query.float() * cos + rotate_half(query.float()) * sin).to(value.dtype)
        key = (key.float() * cos + rotate_half(key.float()) * sin).to(value.dtype)
        scores = torch.matmul(query, key.transpose(2, 3)) * float(attention.scaling)
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        context = torch.matmul(probs, value).transpose(1, 2).reshape(batch, patches, dim)
        return attention.proj(context)


def reference_image_features(
    model: Any, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int], deepstack: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF's own features for [batch, patches, patch_dim]: the images concatenated as its processor sends them
    (with `deepstack`, also Qwen3-VL's DeepStack features [batch, tokens, levels, hidden])."""
    batch = pixel_values.shape[0]
    flat = pixel_values.reshape(-1, pixel_values.shape[-1]).to(model.dtype)
    grids = torch.tensor([list(grid_thw)] * batch, dtype=torch.int64, device=flat.device)
    out = model.model.get_image_features(flat, grids, return_dict=True)
    features = torch.stack(list(out.pooler_output)).to(torch.float32)
    if not deepstack:
        return features
    levels = torch.stack([torch.stack(list(level)) for level in out.deepstack_features], dim=2)
    return features, levels.to(torch.float32)
