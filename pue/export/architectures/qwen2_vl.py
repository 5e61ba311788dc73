"""Qwen2-VL and Qwen2.5-VL (GME, VLM2Vec, jina-embeddings-v4 bases): native-resolution patches, M-RoPE.

Both share the processor (`Qwen2VLImageProcessor`), the language model (Qwen2 layers with 3-D M-RoPE) and the
decoder; their towers differ (Qwen2.5-VL: RMSNorm, gated MLP, windowed attention), which `QwenVisionTower`
handles from the tower's own modules. For a fixed tile the grid is fixed, so:

- the vision graph takes `pixel_values [batch, patches, patch_dim]` (each tile's flattened patches, as the
  processor makes them) and holds the grid's rotary table and windows as constants (`qwen_vision`);
- the decoder graph computes the M-RoPE position ids itself from `input_ids` and `attention_mask`
  (`mrope_position_ids`), so its inputs are the graph contract's three, unchanged: the runtime, calibration,
  TensorRT profiles and the server feed Qwen bundles exactly as LLaVA ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pue.errors import CheckpointError
from pue.export.architectures.base import Architecture, VisionGeometry, use_eager_attention
from pue.export.architectures.decoder import EmbeddingDecoder
from pue.export.architectures.qwen_vision import QwenVisionTower, reference_image_features
from pue.export.architectures.registry import register


def mrope_position_ids(
    mask: torch.Tensor, is_image: torch.Tensor, tokens_per_image: int, grid_w: int, advance: int
) -> torch.Tensor:
    """Qwen2-VL's 3-D position ids [3, batch, seq] (`get_rope_index`) for images of one fixed grid.

    Counted over real tokens only (either padding side): a text token takes the running position on all three
    axes and advances it by 1; the image's k-th token takes (p, p + k // grid_w, p + k % grid_w) with p the
    position where the image starts, and the image advances it by max(grid_h, grid_w) (`advance`). Padding
    positions take the running value, which nothing reads (their keys are masked).
    """
    image = is_image.to(torch.int64)
    within = torch.remainder(torch.clamp(torch.cumsum(image, dim=1) - 1, min=0), tokens_per_image)
    last_of_image = image * (within == tokens_per_image - 1).to(torch.int64)
    step = mask * ((1 - image) + last_of_image * advance)
    start = torch.cumsum(step, dim=1) - step
    height = start + image * torch.div(within, grid_w, rounding_mode="floor")
    width = start + image * torch.remainder(within, grid_w)
    return torch.stack([start, height, width], dim=0)


class MropeEmbeddingDecoder(EmbeddingDecoder):
    """The shared decoder with M-RoPE positions computed in the graph (`mrope_position_ids`)."""

    def __init__(self, *args: Any, tokens_per_image: int, grid_h: int, grid_w: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_per_image = int(tokens_per_image)
        self.grid_w = int(grid_w)
        self.advance = int(max(grid_h, grid_w))

    def positions(self, mask: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        return mrope_position_ids(mask, is_image, self.tokens_per_image, self.grid_w, self.advance)


class QwenVL(Architecture):
    """One Qwen-VL generation: the transformers class name and the tower's width attribute differ."""

    decoder_class: type[nn.Module] = MropeEmbeddingDecoder  # Qwen3-VL's adds DeepStack

    def __init__(self, model_type: str, class_name: str, description: str) -> None:
        self.model_type = model_type
        self.class_name = class_name
        self.description = description

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.class_name)

    def load_processor(self, path: Path) -> Any:
        from pue.export.qwen_processor import load_qwen_processor

        return load_qwen_processor(path)

    def image_kind(self) -> str:
        return "patches"

    def geometry(self, model: Any, tile_size: int, processor: Any = None) -> VisionGeometry:
        spec = self.preprocessing(model, processor, tile_size)
        config = spec.processor_config
        t, h, w = config["grid_thw"]
        return VisionGeometry(
            "patches",
            tile_size,
            crop_size=int(config["resized"][0]),
            num_crops=1,
            tokens_per_image=int(config["tokens_per_image"]),
            patches=int(config["patches"]),
            patch_dim=int(config["patch_dim"]),
            grid_thw=(int(t), int(h), int(w)),
        )

    def preprocessing(self, model: Any, processor: Any, tile_size: int) -> Any:
        from pue.runtime.preprocess_patches import preprocessing_for_patches

        if processor is None:
            raise CheckpointError(f"{self.model_type}: the token count per image needs the image processor")
        spec = preprocessing_for_patches(
            processor.image_processor.to_dict(), tile_size, getattr(processor, "pre_resize", None)
        )
        vision, config = model.config.vision_config, spec.processor_config
        mine = (config["patch_size"], config["temporal_patch_size"], config["merge_size"])
        tower = (int(vision.patch_size), int(vision.temporal_patch_size), int(vision.spatial_merge_size))
        if mine != tower:
            raise CheckpointError(
                f"the image processor's patch, temporal patch and merge sizes {mine} differ from the vision "
                f"tower's {tower}",
                "the processor does not belong to this checkpoint: pass the right one with --processor",
            )
        return spec

    def vision_module(self, model: Any, geometry: VisionGeometry) -> nn.Module:
        return QwenVisionTower(model.model.visual, geometry.grid_thw)

    def reference_image_features(
        self, model: Any, pixel_values: torch.Tensor, geometry: VisionGeometry
    ) -> torch.Tensor:
        return reference_image_features(model, pixel_values, geometry.grid_thw)

    def decoder_module(
        self, model: Any, image_token_id: int, pool_token_id: int | None, geometry: VisionGeometry | None = None
    ) -> nn.Module:
        base = model.model
        use_eager_attention(base.language_model)
        _, grid_h, grid_w = self._llm_grid(model, geometry)
        return self.decoder_class(
            language_model=base.language_model,
            embed_tokens=base.get_input_embeddings(),
            image_token_id=image_token_id,
            pool_token_id=pool_token_id,
            tokens_per_image=grid_h * grid_w,
            grid_h=grid_h,
            grid_w=grid_w,
        )

    def positions(self, model: Any, geometry: VisionGeometry) -> dict[str, Any]:
        _, grid_h, grid_w = self._llm_grid(model, geometry)
        rope = dict(getattr(model.config.text_config, "rope_parameters", None) or {})
        return {
            "kind": "mrope",
            "computed": "in decoder.onnx from input_ids and attention_mask (get_rope_index for one fixed grid)",
            "image_grid": [1, grid_h, grid_w],
            "mrope_section": rope.get("mrope_section"),
        }

    def _llm_grid(self, model: Any, geometry: VisionGeometry | None) -> tuple[int, int, int]:
        if geometry is None:
            raise CheckpointError(f"{self.model_type}: the decoder needs the tile's geometry (its image grid)")
        merge = int(model.config.vision_config.spatial_merge_size)
        t, h, w = geometry.grid_thw
        return t, h // merge, w // merge

    def attention_layout(self, model: Any) -> dict[str, dict[str, Any]]:
        layout = super().attention_layout(model)
        vision = model.config.vision_config
        heads = int(vision.num_heads)
        width = int(getattr(vision, "embed_dim", None) or vision.hidden_size)
        kind = "windowed-encoder" if hasattr(vision, "fullatt_block_indexes") else "encoder"
        layout["vision"] = {"kind": kind, "heads": heads, "head_dim": width // heads}
        return layout


register(QwenVL("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2-VL (GME): native-resolution tower, M-RoPE"))
register(
    QwenVL(
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2.5-VL (VLM2Vec, jina-embeddings-v4 bases): windowed native-resolution tower, M-RoPE",
    )
)
