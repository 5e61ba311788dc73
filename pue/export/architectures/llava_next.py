"""LLaVA-NeXT (LLaVA-1.6, E5-V): CLIP or SigLIP tower, projector, anyres crops packed with newlines."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pue.export.architectures.base import Architecture, VisionGeometry, select_vision_features
from pue.export.architectures.registry import register


class LlavaNextVision(nn.Module):
    """Tower + projector over all crops, then one gather that packs them exactly as HF does for this tile size.

    For a fixed tile every image has the same anyres layout, so HF's data-dependent `pack_image_features`
    (grid shape, unpadding, newline insertion) reduces to a constant index into [crop features..., newline].
    """

    def __init__(self, model: Any, geometry: VisionGeometry, pack_index: torch.Tensor) -> None:
        super().__init__()
        base = model.model
        self.tower = base.vision_tower
        self.projector = base.multi_modal_projector
        self.image_newline = base.image_newline
        self.feature_layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy
        self.geometry = geometry
        self.register_buffer("pack_index", pack_index, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, crops = pixel_values.shape[0], pixel_values.shape[1]
        dtype = self.image_newline.dtype
        flat = pixel_values.reshape(batch * crops, 3, pixel_values.shape[3], pixel_values.shape[4]).to(dtype)
        features = self.projector(select_vision_features(self.tower, flat, self.feature_layer, self.strategy))
        hidden = features.shape[-1]
        features = features.reshape(batch, crops * features.shape[1], hidden)
        newline = self.image_newline.reshape(1, 1, hidden).expand(batch, 1, hidden)
        source = torch.cat([features, newline], dim=1)
        return torch.index_select(source, 1, self.pack_index).to(torch.float32)


def pack_index(model: Any, geometry: VisionGeometry, tokens_per_crop: int) -> torch.Tensor:
    """Ask HF's own `pack_image_features` where each crop token and the newline land, for this tile size."""
    crops = geometry.num_crops
    markers = torch.arange(crops * tokens_per_crop, dtype=torch.float64).reshape(crops, tokens_per_crop, 1)
    newline = torch.tensor([float(crops * tokens_per_crop)], dtype=torch.float64)
    sizes = torch.tensor([[geometry.tile_size, geometry.tile_size]])
    packed, _ = model.model.pack_image_features(
        [markers],
        sizes,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_newline=newline,
    )
    return packed[0][:, 0].round().to(torch.int64)


class LlavaNext(Architecture):
    model_type = "llava_next"
    description = "LLaVA-NeXT / LLaVA-1.6 (E5-V family): CLIP or SigLIP tower, Llama / Mistral / Qwen2 text model"

    def model_class(self) -> type:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def geometry(self, model: Any, tile_size: int, processor: Any = None) -> VisionGeometry:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crop = int(model.config.vision_config.image_size)
        crops = int(image_size_to_num_patches((tile_size, tile_size), model.config.image_grid_pinpoints, crop))
        geometry = VisionGeometry("anyres", tile_size, crop, crops, tokens_per_image=0)
        geometry.tokens_per_image = int(pack_index(model, geometry, self._tokens_per_crop(model)).numel())
        return geometry

    @staticmethod
    def _tokens_per_crop(model: Any) -> int:
        vision = model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        if model.config.vision_feature_select_strategy == "full" and vision.model_type == "clip_vision_model":
            tokens += 1
        return int(tokens)

    def vision_module(self, model: Any, geometry: VisionGeometry) -> nn.Module:
        return LlavaNextVision(model, geometry, pack_index(model, geometry, self._tokens_per_crop(model)))

    def reference_image_features(
        self, model: Any, pixel_values: torch.Tensor, geometry: VisionGeometry
    ) -> torch.Tensor:
        sizes = torch.tensor([[geometry.tile_size, geometry.tile_size]] * pixel_values.shape[0])
        out = model.model.get_image_features(pixel_values.to(model.dtype), sizes, return_dict=True)
        return torch.stack(list(out.pooler_output)).to(torch.float32)


register(LlavaNext())
