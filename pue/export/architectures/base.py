"""What an architecture module declares: how to load the HF model and wrap it into the two graphs.

One small class per architecture (optimum's registry is the model, not its size): the graph wrappers,
their dummy inputs and dynamic axes, the token count per tile, and the HF model's own image features
that the parity gate compares `vision.onnx` against.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pue.bundle import ImagePreprocessing
from pue.export.architectures.decoder import EmbeddingDecoder


@dataclass
class VisionGeometry:
    """The image layout of a fixed tile size: what `vision.onnx` takes and returns."""

    kind: str  # "anyres" ([batch, crops, 3, H, W]), "single" ([batch, 3, H, W]) or "patches" ([batch, patches, dim])
    tile_size: int
    crop_size: int
    num_crops: int
    tokens_per_image: int
    patches: int = 0  # "patches": flattened patches per tile, each of patch_dim values, on a grid_thw grid
    patch_dim: int = 0
    grid_thw: tuple[int, int, int] = (0, 0, 0)

    def pixel_shape(self, batch: int) -> tuple[int, ...]:
        if self.kind == "anyres":
            return (batch, self.num_crops, 3, self.crop_size, self.crop_size)
        if self.kind == "patches":
            return (batch, self.patches, self.patch_dim)
        return (batch, 3, self.crop_size, self.crop_size)


class Architecture(abc.ABC):
    """One supported `model_type`."""

    model_type: str
    description: str

    @abc.abstractmethod
    def model_class(self) -> type:
        """The transformers class that loads the checkpoint."""

    @abc.abstractmethod
    def geometry(self, model: Any, tile_size: int, processor: Any = None) -> VisionGeometry:
        """The vision layout of one tile (`processor` for architectures whose token count the processor decides)."""

    def load_processor(self, path: Path) -> Any | None:
        """The processor of a checkpoint (or processor) folder; None: transformers' AutoProcessor loads it."""
        return None

    def preprocessing(self, model: Any, processor: Any, tile_size: int) -> ImagePreprocessing:
        """What the runtime needs to reproduce the processor at the tile size (manifest `preprocessing`)."""
        from pue.runtime.preprocess import preprocessing_from_config

        return preprocessing_from_config(
            processor.image_processor.to_dict(),
            tile_size,
            self.image_kind(),
            int(model.config.vision_config.image_size),
            getattr(model.config, "image_grid_pinpoints", None),
        )

    def extra_image_features(self, model: Any) -> dict[str, int]:
        """Per-image tensors beyond `image_features` that `vision.onnx` returns and `decoder.onnx` takes, each
        `[batch, tokens, levels, hidden]`, name → levels (Qwen3-VL's `deepstack_features`); none by default."""
        return {}

    def feature_record(self, model: Any) -> dict[str, Any]:
        """What the manifest records about the extra image tensors (`export.deepstack`); empty without them."""
        return {}

    def positions(self, model: Any, geometry: VisionGeometry) -> dict[str, Any]:
        """How the decoder graph positions tokens (manifest `export.positions`)."""
        return {"kind": "1d", "computed": "in decoder.onnx from attention_mask (running count of real tokens)"}

    @abc.abstractmethod
    def vision_module(self, model: Any, geometry: VisionGeometry) -> nn.Module:
        """pixel_values -> image_features [batch, tokens_per_image, hidden], packed as the model places them."""

    @abc.abstractmethod
    def reference_image_features(
        self, model: Any, pixel_values: torch.Tensor, geometry: VisionGeometry
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The HF model's own packed image features for `pixel_values` (what the gate compares vision.onnx with);
        a dict by output name where the vision graph has more outputs (`extra_image_features`)."""

    def decoder_module(
        self, model: Any, image_token_id: int, pool_token_id: int | None, geometry: VisionGeometry | None = None
    ) -> nn.Module:
        """input_ids, attention_mask, image_features -> unit sentence_embedding [batch, hidden]."""
        base = model.model
        use_eager_attention(base.language_model)
        return EmbeddingDecoder(
            language_model=base.language_model,
            embed_tokens=base.get_input_embeddings(),
            image_token_id=image_token_id,
            pool_token_id=pool_token_id,
        )

    def attention_layout(self, model: Any) -> dict[str, dict[str, Any]]:
        """How each graph's attention is laid out, for target-specific fusion (`pue.optimize.attention`).

        The vision tower is an unmasked encoder; the language model is causal (its exported mask is causal plus
        padding, and `pue.runtime` pads on the right, so a causal kernel needs no [seq, seq] mask).
        """
        vision, text = model.config.vision_config, model.config.text_config
        vision_heads = int(vision.num_attention_heads)
        text_heads = int(text.num_attention_heads)
        text_head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // text_heads
        return {
            "vision": {"kind": "encoder", "heads": vision_heads, "head_dim": int(vision.hidden_size) // vision_heads},
            "decoder": {
                "kind": "causal",
                "heads": text_heads,
                "kv_heads": int(getattr(text, "num_key_value_heads", None) or text_heads),
                "head_dim": int(text_head_dim),
            },
        }

    def hidden_size(self, model: Any) -> int:
        return int(model.config.text_config.hidden_size)

    def image_kind(self) -> str:
        return "anyres"


def select_vision_features(
    tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int | list[int], strategy: str
) -> torch.Tensor:
    """The vision tower's hidden state(s) that LLaVA-style models project, as `get_image_features` selects them."""
    outputs = tower(pixel_values, output_hidden_states=True, return_dict=True)
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    selected = []
    for layer in layers:
        state = outputs.hidden_states[layer]
        if strategy == "default":
            state = state[:, 1:]
        selected.append(state)
    return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)


def use_eager_attention(language_model: nn.Module) -> None:
    """Export attention as MatMul + additive mask + Softmax + MatMul.

    HF's SDPA path exports a boolean mask turned into Where/IsNaN over every [batch, heads, seq, seq] score
    tensor in every layer (27 % of the int8 decoder's time measured on CPU); eager attention adds one float mask
    built once per forward. Same math (parity gate), standard ONNX ops only (TensorRT parses them).
    """
    setter = getattr(language_model, "set_attn_implementation", None)
    if callable(setter):
        setter("eager")
    else:  # older transformers
        language_model.config._attn_implementation = "eager"
