"""FLOPs per patch: what embedding one tile costs in arithmetic, from the model config or from the bundle's graphs.

A FLOP here is one multiply or one add, so a matrix product [M, K] x [K, N] costs 2·M·K·N. Counted: every
linear layer, the patch-embedding convolution, and the two attention products (Q·Kᵀ and softmax·V, over the
full sequence × sequence matrix, as the standard exported graphs and eager PyTorch compute them; a causal kernel
could skip half of the decoder's, the fused onnxruntime graphs skip a quarter). The decoder's last layer counts
for the pooled token only, as exported. Not counted: norms, activations, softmax, rotary embeddings, residual adds
(together well under 1 % for these shapes), and the LM head, which an embedding model never runs.

The vision tower is counted up to the layer the projector reads (`vision_feature_layer`, usually -2): the
exported `vision.onnx` drops the unused last layer, and the two counts below (`patch_flops` from the config,
`graph_flops` from the ONNX graph with shapes inferred) agree to the FLOP on the tiny presets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pue.bundle import Manifest, resolve_inside
from pue.errors import PueError
from pue.runtime.backends.base import feature_inputs

# transformers' class defaults, for config.json files that leave a size out (many published ones do).
_VISION_DEFAULTS = {
    "clip_vision_model": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
        "num_channels": 3,
    },
    "siglip_vision_model": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 16,
        "num_channels": 3,
    },
}
# LLaVA / LLaVA-NeXT configs without a vision_config get CLIP ViT-L/14-336, without a text_config Llama-2-7B.
_LLAVA_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
}
_TEXT_DEFAULTS = {
    "llama": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "mistral": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "qwen2": {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32},
}
_MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "Gemm"}
_CONV_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}


@dataclass
class FlopCount:
    """FLOPs of one image row: the vision graph (tower + projector) and the decoder over the whole prompt."""

    vision: int
    decoder: int
    crops: int
    image_tokens: int
    sequence_length: int
    source: str  # "config" (checkpoint config.json) or "graph" (the bundle's ONNX graphs)

    @property
    def total(self) -> int:
        return self.vision + self.decoder

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


# --------------------------------------------------------------------------------------------- from a config


def _as_dict(config: Any) -> dict[str, Any]:
    """The config as a dict, with transformers' defaults filled in where transformers is installed."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if not isinstance(config, dict):
        raise PueError(f"expected a config dict (config.json) or a transformers config, got {type(config).__name__}")
    if _is_complete(config):
        return config  # importing transformers takes seconds: only when a size is missing
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(**config).to_dict()
    except Exception:  # no transformers, or a config it does not know: the tables above fill the gaps
        return config


_VISION_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def _is_complete(config: dict[str, Any]) -> bool:
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    return all(vision.get(key) is not None for key in _VISION_KEYS) and all(
        text.get(key) is not None for key in _TEXT_KEYS
    )


def _vision_config(config: dict[str, Any]) -> dict[str, Any]:
    vision = dict(config.get("vision_config") or {})
    model_type = vision.get("model_type", "clip_vision_model")
    base = _LLAVA_VISION if not config.get("vision_config") else _VISION_DEFAULTS.get(model_type, {})
    merged = {**base, **{k: v for k, v in vision.items() if v is not None}, "model_type": model_type}
    missing = [key for key in _VISION_KEYS if merged.get(key) is None]
    if missing:  # not a fixed-size ViT (Qwen-VL's native-resolution towers): the bundle's graphs are counted instead
        raise PueError(f"the vision config ({model_type}) has no {', '.join(missing)}: not countable from the config")
    return merged


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config") or config  # a plain language-model config is accepted too
    defaults = _TEXT_DEFAULTS.get(text.get("model_type", "llama"), _TEXT_DEFAULTS["llama"])
    merged = {**defaults, **{k: v for k, v in text.items() if v is not None}}
    merged.setdefault("num_key_value_heads", merged["num_attention_heads"])
    merged.setdefault("head_dim", merged["hidden_size"] // merged["num_attention_heads"])
    return merged


def _layers_needed(total_layers: int, feature_layer: Any) -> int:
    """Encoder layers that must run for hidden_states[feature_layer] (index 0 is the embeddings)."""
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return max(int(layer) if int(layer) >= 0 else total_layers + 1 + int(layer) for layer in layers)


def _transformer_layer_flops(
    tokens: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, gated: bool
) -> int:
    """One pre-norm block: Q, K, V, O projections, Q·Kᵀ and softmax·V, and the MLP (gated: 3 matrices)."""
    projections = 2 * tokens * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim)
    attention = 4 * tokens * tokens * heads * head_dim
    mlp = 2 * tokens * hidden * intermediate * (3 if gated else 2)
    return projections + attention + mlp


def vision_flops(config: Any, crops: int) -> int:
    """FLOPs of `vision.onnx` for one image of `crops` crops: patch embedding, tower, projector."""
    config = _as_dict(config)
    vision = _vision_config(config)
    text = _text_config(config)
    patches = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    has_cls = vision["model_type"] == "clip_vision_model"
    tokens = patches + int(has_cls)
    hidden = int(vision["hidden_size"])
    heads = int(vision["num_attention_heads"])
    feature_layer = config.get("vision_feature_layer", -2)
    layers = _layers_needed(int(vision["num_hidden_layers"]), feature_layer)
    patch_embedding = 2 * patches * int(vision.get("num_channels", 3)) * int(vision["patch_size"]) ** 2 * hidden
    tower = layers * _transformer_layer_flops(
        tokens, hidden, heads, heads, hidden // heads, int(vision["intermediate_size"]), gated=False
    )
    strategy = config.get("vision_feature_select_strategy", "default")
    selected = tokens - 1 if (strategy == "default" and has_cls) else tokens
    feature_width = hidden * (len(feature_layer) if isinstance(feature_layer, (list, tuple)) else 1)
    text_hidden = int(text["hidden_size"])
    projector = 2 * selected * (feature_width * text_hidden + text_hidden * text_hidden)
    return crops * (patch_embedding + tower + projector)


def decoder_flops(config: Any, sequence_length: int) -> int:
    """FLOPs of `decoder.onnx` for one row of `sequence_length` tokens (no LM head: embeddings are hidden states).

    The last layer counts as exported (`pue.export.architectures.pooled_layer`): keys and values of every token,
    the projections and MLP of the pooled token only (its single attention row, 4·seq·heads·head_dim elementwise
    products, is left out like the other elementwise work).
    """
    text = _text_config(_as_dict(config))
    hidden, heads, kv_heads = (
        int(text["hidden_size"]),
        int(text["num_attention_heads"]),
        int(text["num_key_value_heads"]),
    )
    head_dim, intermediate = int(text["head_dim"]), int(text["intermediate_size"])
    per_layer = _transformer_layer_flops(sequence_length, hidden, heads, kv_heads, head_dim, intermediate, gated=True)
    last_layer = (
        2 * sequence_length * hidden * 2 * kv_heads * head_dim  # K and V of every token
        + 2 * hidden * 2 * heads * head_dim  # Q and O of the pooled token
        + 2 * hidden * intermediate * 3  # its MLP
    )
    return (int(text["num_hidden_layers"]) - 1) * per_layer + last_layer


def patch_flops(config: Any, crops: int, image_tokens: int, sequence_length: int) -> FlopCount:
    """FLOPs of one image row, from the checkpoint's config (dict from config.json, or a transformers config)."""
    return FlopCount(
        vision_flops(config, crops),
        decoder_flops(config, sequence_length),
        crops,
        image_tokens,
        sequence_length,
        "config",
    )


# --------------------------------------------------------------------------------------------- from a bundle


def image_sequence_length(bundle_dir: str | Path, manifest: Manifest) -> int:
    """Tokens of one image row of this bundle (the rendered image prompt with the image tokens expanded)."""
    from pue.runtime.prompts import PromptTokenizer

    return len(PromptTokenizer.for_bundle(bundle_dir, manifest).image_prompt())


def bundle_crops(manifest: Manifest) -> int:
    return int(manifest.preprocessing.num_crops or 1)


def graph_flops(bundle_dir: str | Path, manifest: Manifest, sequence_length: int | None = None) -> FlopCount:
    """FLOPs of one image row counted in the bundle's own ONNX graphs (needs onnx and onnxruntime's tools).

    The graphs' inputs are fixed to one image row, shapes are inferred symbolically, and every matrix product
    and convolution is summed (float, integer and Q/DQ forms alike, so quantized bundles count the same).
    Only the graph protobufs are read, never their external weights.
    """
    if sequence_length is None:
        sequence_length = image_sequence_length(bundle_dir, manifest)
    hidden = int(manifest.hidden_size)
    pixel_shape = [1, *[int(d) for d in manifest.graphs["vision"].inputs[0].shape[1:]]]
    vision = _count_graph(
        resolve_inside(bundle_dir, manifest.graphs["vision"].file.path), {"pixel_values": pixel_shape}
    )
    decoder = _count_graph(
        resolve_inside(bundle_dir, manifest.graphs["decoder"].file.path),
        {
            "input_ids": [1, sequence_length],
            "attention_mask": [1, sequence_length],
            **{
                spec.name: [
                    1,
                    int(manifest.tokens_per_image),
                    *[d if isinstance(d, int) else hidden for d in spec.shape[2:]],
                ]
                for spec in feature_inputs(manifest.graphs["decoder"].inputs)
            },
        },
    )
    return FlopCount(vision, decoder, bundle_crops(manifest), int(manifest.tokens_per_image), sequence_length, "graph")


def _count_graph(path: Path, input_shapes: dict[str, list[int]]) -> int:
    try:
        import onnx
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as exc:
        raise PueError(
            f"counting FLOPs in an ONNX graph needs onnx and onnxruntime ({exc})",
            'install them with: pip install "pue[export,cpu]", or pass --reference',
        ) from exc
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: a damaged graph file
        raise PueError(f"cannot read {path.name}: {exc}") from exc
    for graph_input in model.graph.input:
        if graph_input.name in input_shapes:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, value in zip(dims, input_shapes[graph_input.name], strict=True):
                dim.ClearField("dim_param")
                dim.dim_value = int(value)
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # the shape inferencer raises plain Exceptions on graphs it cannot follow
        raise PueError(
            f"cannot infer the shapes of {path.name}: {exc}", "pass --reference to count from the checkpoint's config"
        ) from exc
    shapes: dict[str, list[Any]] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    for initializer in inferred.graph.initializer:
        shapes[initializer.name] = list(initializer.dims)
    total = 0
    for node in inferred.graph.node:
        if node.op_type in _MATMUL_OPS:
            total += _matmul_flops(node, shapes, path)
        elif node.op_type in _CONV_WEIGHT_INPUT:
            out = _known(shapes.get(node.output[0]), node, path)
            weight = _known(shapes.get(node.input[_CONV_WEIGHT_INPUT[node.op_type]]), node, path)
            total += 2 * math.prod(out) * math.prod(weight[1:])
    return total


def _matmul_flops(node: Any, shapes: dict[str, list[Any]], path: Path) -> int:
    out = _known(shapes.get(node.output[0]), node, path)
    left = _known(shapes.get(node.input[0]), node, path)
    inner = left[-1]
    if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        inner = left[0]
    return 2 * inner * math.prod(out)


def _known(shape: list[Any] | None, node: Any, path: Path) -> list[int]:
    if shape is None or any(d is None for d in shape):
        raise PueError(
            f"{path.name}: the shape around node '{node.name}' ({node.op_type}) could not be inferred",
            "pass --reference to count FLOPs from the checkpoint's config",
        )
    return [int(d) for d in shape]
