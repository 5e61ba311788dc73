"""Resolving an image processor's config (transformers' `preprocessor_config.json`, class defaults for missing
keys) into the bundle's `ImagePreprocessing`, checked by laying out the crops of one tile.

Only numpy, Pillow, `pue.bundle` and `pue.errors` are imported.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from pue.bundle import ImagePreprocessing
from pue.errors import CheckpointError
from pue.runtime.preprocess_geometry import KINDS, make_plan

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_HALF = [0.5, 0.5, 0.5]
_E5V_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_BICUBIC = int(Image.Resampling.BICUBIC)

# Class defaults of transformers' image processors (a key missing or null in the config takes these).
_CLIP_LIKE: dict[str, Any] = {
    "size": {"shortest_edge": 224},
    "crop_size": {"height": 224, "width": 224},
    "default_to_square": False,
    "image_mean": _CLIP_MEAN,
    "image_std": _CLIP_STD,
    "resample": _BICUBIC,
    "rescale_factor": 1 / 255,
    "do_resize": True,
    "do_center_crop": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "do_pad": None,
    "pad_size": None,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlavaNextImageProcessor": {**_CLIP_LIKE, "do_pad": True, "image_grid_pinpoints": _E5V_PINPOINTS},
    "LlavaImageProcessor": {**_CLIP_LIKE, "do_pad": False},
    "CLIPImageProcessor": dict(_CLIP_LIKE),
    "SiglipImageProcessor": {
        **_CLIP_LIKE,
        "size": {"height": 224, "width": 224},
        "crop_size": None,
        "do_center_crop": None,
        "image_mean": _HALF,
        "image_std": _HALF,
    },
}
_KIND_FALLBACK = {"anyres": "LlavaNextImageProcessor", "single": "CLIPImageProcessor"}
_SIZE_KEY_SETS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})


def preprocessing_from_config(
    processor_config: dict[str, Any],
    tile_size: int,
    kind: str,
    vision_image_size: int,
    image_grid_pinpoints: list | None,
) -> ImagePreprocessing:
    """Build the `ImagePreprocessing` of a checkpoint for tiles of `tile_size` x `tile_size`.

    `processor_config` is the image processor dict, as transformers 5 saves it in
    ``processor_config.json["image_processor"]`` or older checkpoints in ``preprocessor_config.json``.
    Keys it lacks (or sets to null) take the defaults of the class named by its ``image_processor_type``
    (LlavaNext / Llava / CLIP / Siglip image processors; an unknown or missing type takes LlavaNext's for
    ``kind="anyres"`` and CLIP's for ``kind="single"``), exactly as transformers does. `image_grid_pinpoints`
    (the model config's) is used when the processor config has none and must agree with it when both do.
    `vision_image_size` (the vision tower's input size) must equal the crop size this yields.
    The resolved settings are kept in ``processor_config`` of the result, which is what the runtime uses.
    """
    if kind not in KINDS:
        raise CheckpointError(f"unknown image preprocessing kind {kind!r}", f"expected one of {', '.join(KINDS)}")
    if not isinstance(processor_config, dict):
        raise CheckpointError(f"the image processor config must be a dict, got {type(processor_config).__name__}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size <= 0:
        raise CheckpointError(f"tile size must be a positive integer, got {tile_size!r}")
    tile_size = int(tile_size)
    type_name = _processor_type(processor_config)
    defaults = _DEFAULTS.get(type_name) or _DEFAULTS[_KIND_FALLBACK[kind]]
    raw = {key: processor_config.get(key) for key in defaults}
    merged = {key: (raw[key] if raw[key] is not None else defaults[key]) for key in defaults}
    default_to_square = bool(merged["default_to_square"])

    resolved: dict[str, Any] = {
        "image_processor_type": type_name,
        "do_resize": bool(merged["do_resize"]),
        "size": _size_dict(merged["size"], default_to_square, "size"),
        "default_to_square": default_to_square,
        "resample": _resample(merged["resample"]),
        "do_center_crop": bool(merged["do_center_crop"]),
        "crop_size": _size_dict(merged["crop_size"], True, "crop_size") if merged["crop_size"] is not None else None,
        "do_rescale": bool(merged["do_rescale"]),
        "rescale_factor": _number(merged["rescale_factor"], "rescale_factor"),
        "do_normalize": bool(merged["do_normalize"]),
        "image_mean": _triple(merged["image_mean"], "image_mean"),
        "image_std": _triple(merged["image_std"], "image_std"),
        "do_convert_rgb": bool(merged["do_convert_rgb"]),
        "do_pad": bool(merged["do_pad"]),
        "pad_size": _size_dict(merged["pad_size"], True, "pad_size") if merged["pad_size"] is not None else None,
    }
    if resolved["do_center_crop"]:
        crop = resolved["crop_size"]
        if crop is None or set(crop) != {"height", "width"}:
            raise CheckpointError(
                f"do_center_crop is set but crop_size is {crop!r}", "crop_size needs height and width"
            )
    if resolved["do_normalize"] and 0.0 in resolved["image_std"]:
        raise CheckpointError(f"image_std {resolved['image_std']} contains 0")
    if kind == "anyres":
        resolved["image_grid_pinpoints"] = _pinpoints(
            processor_config.get("image_grid_pinpoints"), image_grid_pinpoints
        )
        if resolved["size"].get("shortest_edge") and resolved["size"].get("longest_edge"):
            raise CheckpointError("LLaVA-NeXT processors with size {shortest_edge, longest_edge} are not supported")
    else:
        # LlavaImageProcessor's do_pad pads to a square with the mean colour before resizing; the others pad a
        # batch to its largest size (or pad_size) with zeros after normalising.
        resolved["pad_to_square"] = type_name == "LlavaImageProcessor" and resolved["do_pad"]

    spec = ImagePreprocessing(
        kind=kind,
        tile_size=tile_size,
        crop_size=0,
        num_crops=0,
        image_mean=resolved["image_mean"],
        image_std=resolved["image_std"],
        rescale_factor=resolved["rescale_factor"],
        resample=resolved["resample"],
        processor_config=resolved,
    )
    try:
        plan = make_plan(spec.kind, resolved, tile_size, tile_size)
    except ValueError as exc:
        raise CheckpointError(f"the image processor config cannot process {tile_size}px tiles: {exc}") from exc
    out_h, out_w = plan.out_size
    if out_h != out_w:
        raise CheckpointError(f"the image processor turns a {tile_size}px tile into {out_w}x{out_h} crops, not squares")
    if out_h != vision_image_size:
        raise CheckpointError(
            f"the image processor makes {out_h}px crops but the vision tower takes {vision_image_size}px images",
            "the checkpoint's processor config and vision config disagree",
        )
    spec.crop_size = out_h
    spec.num_crops = len(plan.crops) if kind == "anyres" else 1
    return spec


def _processor_type(config: dict[str, Any]) -> str:
    name = config.get("image_processor_type") or config.get("feature_extractor_type") or ""
    name = str(name)
    for suffix in ("Fast", "Pil"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("FeatureExtractor", "ImageProcessor")


def _size_dict(value: Any, default_to_square: bool, name: str) -> dict[str, int]:
    if isinstance(value, bool):
        raise CheckpointError(f"{name} {value!r} is not a size")
    if isinstance(value, int):
        size = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        size = {"height": value[0], "width": value[1]}
    elif isinstance(value, dict):
        size = {k: v for k, v in value.items() if v is not None}
    else:
        raise CheckpointError(f"{name} {value!r} is not a size")
    if set(size) not in _SIZE_KEY_SETS:
        raise CheckpointError(
            f"{name} {value!r} is not supported",
            "expected {height, width}, {shortest_edge} or {shortest_edge, longest_edge}",
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values()):
        raise CheckpointError(f"{name} {value!r} must hold positive integers")
    return dict(size)


def _resample(value: Any) -> int:
    valid = {int(r) for r in Image.Resampling}
    if isinstance(value, bool) or not isinstance(value, int) or int(value) not in valid:
        raise CheckpointError(
            f"resample {value!r} is not a Pillow resampling filter", f"expected one of {sorted(valid)}"
        )
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{name} {value!r} is not a finite number")
    return float(value)


def _triple(value: Any, name: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise CheckpointError(f"{name} {value!r} must be a number or 3 numbers")
    return [_number(v, name) for v in value]


def _pinpoints(from_processor: Any, from_model: Any) -> list[list[int]]:
    def clean(value: Any, where: str) -> list[list[int]]:
        try:
            pins = [[int(h), int(w)] for h, w in value]
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"image_grid_pinpoints in the {where} config is malformed: {value!r}") from exc
        if not pins or any(h <= 0 or w <= 0 for h, w in pins):
            raise CheckpointError(f"image_grid_pinpoints in the {where} config is malformed: {value!r}")
        return pins

    processor = clean(from_processor, "processor") if from_processor is not None else None
    model = clean(from_model, "model") if from_model is not None else None
    if processor is not None and model is not None and processor != model:
        raise CheckpointError(
            f"image_grid_pinpoints differ between the image processor ({processor}) and the model config ({model})",
            "the processor's grid decides the crops and the model's their token layout; they must agree",
        )
    if processor is not None:
        return processor
    if model is not None:
        return model
    return [list(p) for p in _E5V_PINPOINTS]
