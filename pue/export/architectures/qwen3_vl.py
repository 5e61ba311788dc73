"""Qwen3-VL (HOMIE, Qwen3-VL-Embedding bases): Qwen2-VL's family plus DeepStack and interleaved M-RoPE.

What it shares with Qwen2-VL (`qwen2_vl.QwenVL`): the processor (`Qwen2VLImageProcessor`, here patch 16 × merge 2),
the patches layout of `vision.onnx`, the tower wrapper (`qwen_vision`, which also resamples Qwen3-VL's learned
position table to the grid) and the M-RoPE ids computed in the decoder graph (the same `get_rope_index` rule; the
language model's rotary module interleaves the sections itself, `mrope_interleaved`).

What it adds is DeepStack: the outputs of a few vision blocks, each through its own merger, are added to the
hidden states at the image-token positions after the first decoder layers (level i after layer i). The graph
contract grows one tensor, carried like `image_features`:

- `vision.onnx` also returns `deepstack_features [batch, tokens_per_image, levels, hidden]`;
- `decoder.onnx` also takes `deepstack_features [batch, image_tokens, levels, hidden]`, placed by the runtime per
  row exactly as `image_features` (a row's images one after another, zeros for text rows), and gathers it to the
  image-token positions with the same index; every other position gets zero, and adding zero is not adding.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
from torch import nn

from pue.export.architectures.base import VisionGeometry
from pue.export.architectures.qwen2_vl import MropeEmbeddingDecoder, QwenVL
from pue.export.architectures.qwen_vision import reference_image_features
from pue.export.architectures.registry import register

DEEPSTACK_FEATURES = "deepstack_features"


def additive_deepstack(language_model: nn.Module) -> nn.Module:
    """A view of the language model (parameters shared) whose DeepStack step adds a full [batch, seq, hidden] tensor.

    HF's `_deepstack_process` writes `hidden[visual_pos_masks] += embeds` with the image tokens of the whole batch
    in order: a boolean scatter whose shape depends on the data. The decoder graph hands it embeds already placed
    at their positions and zero elsewhere, so the same step is one addition.
    """
    view = copy.copy(language_model)

    def add_placed(self: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, placed: torch.Tensor) -> torch.Tensor:
        return hidden + placed.to(hidden.dtype)

    view._deepstack_process = types.MethodType(add_placed, view)
    return view


class DeepstackEmbeddingDecoder(MropeEmbeddingDecoder):
    """The M-RoPE decoder with a fourth input, `deepstack_features`, added after the first decoder layers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.language_model = additive_deepstack(self.language_model)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
        deepstack_features: torch.Tensor,
    ) -> torch.Tensor:
        return self.embed(input_ids, attention_mask, image_features, deepstack_features)


class Qwen3VL(QwenVL):
    """Qwen3-VL: `QwenVL` plus the DeepStack tensor in both graphs."""

    decoder_class = DeepstackEmbeddingDecoder

    def extra_image_features(self, model: Any) -> dict[str, int]:
        return {DEEPSTACK_FEATURES: len(model.config.vision_config.deepstack_visual_indexes)}

    def reference_image_features(
        self, model: Any, pixel_values: torch.Tensor, geometry: VisionGeometry
    ) -> dict[str, torch.Tensor]:
        features, deepstack = reference_image_features(model, pixel_values, geometry.grid_thw, deepstack=True)
        return {"image_features": features, DEEPSTACK_FEATURES: deepstack}

    def positions(self, model: Any, geometry: VisionGeometry) -> dict[str, Any]:
        # transformers' Qwen3-VL rotary module interleaves the sections whatever the config's flag says
        return super().positions(model, geometry) | {"mrope_interleaved": True}

    def feature_record(self, model: Any) -> dict[str, Any]:
        """DeepStack as the manifest records it: which vision blocks feed which decoder layers, through what."""
        blocks = [int(i) for i in model.config.vision_config.deepstack_visual_indexes]
        return {
            "deepstack": {
                "input": DEEPSTACK_FEATURES,
                "levels": len(blocks),
                "vision_blocks": blocks,
                "added_after_decoder_layers": list(range(len(blocks))),
            }
        }


register(
    Qwen3VL(
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        "Qwen3-VL (HOMIE, Qwen3-VL-Embedding): native-resolution tower with DeepStack, interleaved M-RoPE",
    )
)
