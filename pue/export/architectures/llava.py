"""LLaVA-1.5 / LLaVA-Interleave layout: one image, tower + projector, no crops (SigLIP + Qwen2 is typical)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pue.export.architectures.base import Architecture, VisionGeometry, select_vision_features
from pue.export.architectures.registry import register


class LlavaVision(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        base = model.model
        self.tower = base.vision_tower
        self.projector = base.multi_modal_projector
        self.feature_layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy
        self.dtype_anchor = next(self.projector.parameters())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values.to(self.dtype_anchor.dtype)
        features = self.projector(select_vision_features(self.tower, pixels, self.feature_layer, self.strategy))
        return features.to(torch.float32)


class Llava(Architecture):
    model_type = "llava"
    description = "LLaVA-1.5 / LLaVA-Interleave: CLIP or SigLIP tower, one image, Llama / Qwen2 text model"

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def image_kind(self) -> str:
        return "single"

    def geometry(self, model: Any, tile_size: int, processor: Any = None) -> VisionGeometry:
        vision = model.config.vision_config
        crop = int(vision.image_size)
        tokens = (crop // vision.patch_size) ** 2
        has_cls = vision.model_type == "clip_vision_model"
        if has_cls and model.config.vision_feature_select_strategy == "full":
            tokens += 1
        return VisionGeometry("single", tile_size, crop, 1, int(tokens))

    def vision_module(self, model: Any, geometry: VisionGeometry) -> nn.Module:
        return LlavaVision(model)

    def reference_image_features(
        self, model: Any, pixel_values: torch.Tensor, geometry: VisionGeometry
    ) -> torch.Tensor:
        out = model.model.get_image_features(pixel_values.to(model.dtype), return_dict=True)
        features = out.pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        return features.to(torch.float32)


register(Llava())
