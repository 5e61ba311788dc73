"""Image preprocessing in numpy + Pillow that reproduces transformers' slow (PIL) image processors exactly.

Two layouts are supported, chosen by `ImagePreprocessing.kind`:

* ``"anyres"`` (LLaVA-NeXT, transformers' ``LlavaNextImageProcessorPil``): the best grid resolution is
  chosen among ``image_grid_pinpoints`` (largest effective resolution, then least waste), the image is
  resized into it keeping its aspect ratio (sizes rounded up, capped), zero-padded to it symmetrically,
  cut into ``patch`` x ``patch`` crops row by row, and a base crop (the whole image resized to the
  processor size) is put first; every crop then goes through resize / centre crop / rescale / normalise.
  Output ``[N, num_crops, 3, S, S]``.
* ``"single"`` (LLaVA): transformers' ``CLIPImageProcessorPil`` (shortest edge resized, then centre crop),
  ``SiglipImageProcessorPil`` (resized straight to height x width) or ``LlavaImageProcessorPil`` (optionally
  padded to a square with the mean colour first), all expressed by the same config keys.
  Output ``[N, 3, S, S]``.

Resizes go through Pillow on uint8 RGB data with the checkpoint's filter, exactly as transformers does;
rescale and normalise are applied by a per-channel lookup table whose 256 entries are computed with the
same float64-then-float32 arithmetic as transformers, so pixel values match bit for bit.

Only numpy, Pillow, `pue.bundle` and `pue.errors` are imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pue.bundle import ImagePreprocessing
from pue.errors import BundleError, CheckpointError, InputError

__all__ = ["ImagePreprocessor", "preprocessing_from_config", "select_best_resolution"]

KINDS = ("anyres", "single")

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


# ----------------------------------------------------------------------------------------------------------------
# Geometry (pure functions of sizes; shared by config resolution and the preprocessor)
# ----------------------------------------------------------------------------------------------------------------


def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of grid resolution (h, w): most effective pixels, then fewest wasted; first wins ties."""
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_h * pin_w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_h, pin_w), effective, wasted
    if best is None:
        raise ValueError(f"no usable grid resolution among {pinpoints} for a {width}x{height} image")
    return best


def _fit_inside(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size of the image scaled to fit (target_h, target_w) keeping its aspect ratio (rounded up, capped)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def _resize_target(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """Output (h, w) of transformers' PIL-backend resize for a size dict."""
    if size.get("shortest_edge") and size.get("longest_edge"):
        return _shortest_longest(height, width, size["shortest_edge"], size["longest_edge"])
    if size.get("shortest_edge"):
        edge = size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (new_long, edge) if width <= height else (edge, new_long)
    return size["height"], size["width"]


def _shortest_longest(height: int, width: int, edge: int, max_size: int) -> tuple[int, int]:
    raw = None
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * edge > max_size:
        raw = max_size * low / high
        edge = int(round(raw))
    if (height <= width and height == edge) or (width <= height and width == edge):
        return height, width
    if width < height:
        return (int(raw * height / width) if raw is not None else int(edge * height / width)), edge
    return edge, (int(raw * width / height) if raw is not None else int(edge * width / height))


def _window(source: int, target: int) -> tuple[int, int, int]:
    """Centre crop along one axis: (source start, destination start, length); pads with zeros when short."""
    if source >= target:
        return (source - target) // 2, 0, target
    return 0, math.ceil((target - source) / 2), source


@dataclass(frozen=True)
class _Crop:
    """One crop of the anyres layout: a region of the padded grid canvas, or the base image."""

    base: bool
    top: int = 0
    left: int = 0
    height: int = 0
    width: int = 0


@dataclass(frozen=True)
class _Plan:
    """Everything about the layout of one input size; computed once per size."""

    grid: tuple[int, int]  # padded grid canvas (h, w); anyres only
    grid_resized: tuple[int, int]  # the image resized into the grid, before padding
    grid_offset: tuple[int, int]  # where it is pasted (top, left)
    base_size: tuple[int, int]
    crops: tuple[_Crop, ...]
    crop_size: tuple[int, int]  # every crop after resize / centre crop
    out_size: tuple[int, int]  # the same, or pad_size when a single image is padded to it


# ----------------------------------------------------------------------------------------------------------------
# Config resolution
# ----------------------------------------------------------------------------------------------------------------


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
        plan = _make_plan(spec.kind, resolved, tile_size, tile_size)
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


def _make_plan(kind: str, config: dict[str, Any], height: int, width: int) -> _Plan:
    """Lay out the crops of one (height, width) input."""
    size = config["size"]

    def finish(h: int, w: int) -> tuple[int, int]:
        if config["do_resize"]:
            h, w = _resize_target(h, w, size)
        if config["do_center_crop"]:
            h, w = config["crop_size"]["height"], config["crop_size"]["width"]
        return h, w

    if kind == "single":
        h, w = height, width
        if config.get("pad_to_square"):
            h = w = max(h, w)
        inner = out = finish(h, w)
        pad = config.get("pad_size") if config["do_pad"] and not config.get("pad_to_square") else None
        if pad is not None:
            if pad["height"] < out[0] or pad["width"] < out[1]:
                raise ValueError(f"pad_size {pad} is smaller than the processed image {out}")
            out = (pad["height"], pad["width"])
        return _Plan((0, 0), (0, 0), (0, 0), (0, 0), (_Crop(base=True, height=h, width=w),), inner, out)

    if size.get("height") and size.get("width"):
        base_size = (size["height"], size["width"])
    else:
        base_size = (size["shortest_edge"], size["shortest_edge"])
    crop = config["crop_size"]
    if crop and crop.get("height"):
        patch = crop["height"]
    elif size.get("height"):
        patch = size["height"]
    else:
        patch = size["shortest_edge"]
    grid = select_best_resolution(height, width, config["image_grid_pinpoints"])
    resized = _fit_inside(height, width, *grid)
    offset = ((grid[0] - resized[0]) // 2, (grid[1] - resized[1]) // 2)
    crops = [_Crop(base=True, height=base_size[0], width=base_size[1])]
    for top in range(0, grid[0], patch):
        for left in range(0, grid[1], patch):
            crops.append(
                _Crop(
                    base=False, top=top, left=left, height=min(patch, grid[0] - top), width=min(patch, grid[1] - left)
                )
            )
    outs = {finish(c.height, c.width) for c in crops}
    if len(outs) != 1:
        raise ValueError(f"the crops come out in different sizes {sorted(outs)}; set crop_size or a height/width size")
    out = outs.pop()
    return _Plan(grid, resized, offset, base_size, tuple(crops), out, out)


# ----------------------------------------------------------------------------------------------------------------
# The preprocessor
# ----------------------------------------------------------------------------------------------------------------


class ImagePreprocessor:
    """Turns RGB tiles of the bundle's tile size into the vision graph's `pixel_values`.

    ``preprocessor(tiles)`` takes a list of RGB PIL images of ``tile_size`` x ``tile_size`` (bring them there
    with `pue.runtime.images.load_image` and `fit_to_tile`) and returns float32
    ``[N, num_crops, 3, S, S]`` for ``kind="anyres"`` or ``[N, 3, S, S]`` for ``kind="single"``, equal to what
    transformers' PIL image processor computes for the same tiles.
    """

    def __init__(self, spec: ImagePreprocessing) -> None:
        if spec.kind not in KINDS:
            raise BundleError(f"unknown image preprocessing kind {spec.kind!r}", f"expected one of {', '.join(KINDS)}")
        config = dict(spec.processor_config)
        required = {"do_resize", "size", "do_center_crop", "crop_size", "do_rescale", "do_normalize", "do_pad"}
        if spec.kind == "anyres":
            required.add("image_grid_pinpoints")
        missing = sorted(required - set(config))
        if missing:
            raise BundleError(
                f"the bundle's image preprocessing lacks {', '.join(missing)}",
                "rebuild the bundle with pue-export (preprocessing_from_config writes them)",
            )
        self.spec = spec
        self.kind = spec.kind
        self.tile_size = int(spec.tile_size)
        self.resample = int(spec.resample)
        self._config = config
        try:
            self._plan = _make_plan(self.kind, config, self.tile_size, self.tile_size)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"the bundle's image preprocessing is malformed: {exc!r}") from exc
        out_h, out_w = self._plan.out_size
        self.crop_size = out_h
        self.num_crops = len(self._plan.crops) if self.kind == "anyres" else 1
        if (out_h, out_w, self.num_crops) != (spec.crop_size, spec.crop_size, spec.num_crops):
            raise BundleError(
                f"the bundle's image preprocessing says {spec.num_crops} crops of {spec.crop_size}px but its settings "
                f"give {self.num_crops} of {out_w}x{out_h}px",
                "rebuild the bundle with pue-export",
            )
        self._lut = _lookup_table(
            config["do_rescale"], spec.rescale_factor, config["do_normalize"], spec.image_mean, spec.image_std
        )

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one tile's pixel values (without the batch dimension)."""
        size = self.crop_size
        return (self.num_crops, 3, size, size) if self.kind == "anyres" else (3, size, size)

    def __call__(self, tiles: list[Image.Image]) -> np.ndarray:
        for index, tile in enumerate(tiles):
            self._check_tile(tile, index)
        plan = self._plan
        inner_h, inner_w = plan.crop_size  # before pad_size padding (single kind only; the padding stays 0.0)
        out_h, out_w = plan.out_size
        padded = (inner_h, inner_w) != (out_h, out_w)
        allocate = np.zeros if padded else np.empty
        pixels = allocate((len(tiles), len(plan.crops), 3, out_h, out_w), dtype=np.float32)
        raw = np.zeros((len(plan.crops), inner_h, inner_w, 3), dtype=np.uint8)  # one tile's crops, reused
        for index, tile in enumerate(tiles):
            if self.kind == "anyres":
                self._anyres(tile, raw)
            else:
                self._single(tile, raw[0])
            # rescale + normalise by a per-channel table lookup, bit-identical to transformers; one plane at a
            # time, while the tile's uint8 crops are still in cache
            for k in range(len(plan.crops)):
                for channel in range(3):
                    if padded:
                        pixels[index, k, channel, :inner_h, :inner_w] = self._lut[channel][raw[k, :, :, channel]]
                    else:
                        np.take(self._lut[channel], raw[k, :, :, channel], out=pixels[index, k, channel], mode="clip")
        return pixels if self.kind == "anyres" else pixels[:, 0]

    # -- per tile ------------------------------------------------------------------------------------------------

    def _check_tile(self, tile: Any, index: int) -> None:
        if not isinstance(tile, Image.Image):
            raise InputError(
                f"expected a PIL image tile, got {type(tile).__name__}", index=index, hint="load it with load_image"
            )
        if tile.mode != "RGB":
            raise InputError(
                f"expected an RGB tile, got mode {tile.mode!r}", index=index, hint="load it with load_image"
            )
        if tile.size != (self.tile_size, self.tile_size):
            raise InputError(
                f"tile is {tile.size[0]}x{tile.size[1]} px, the bundle takes {self.tile_size}x{self.tile_size}",
                index=index,
                hint="bring it to the tile size with fit_to_tile",
            )

    def _resized(self, image: Image.Image, height: int, width: int) -> Image.Image:
        if image.size == (width, height):
            return image  # Pillow returns an unchanged copy for a same-size resize
        return image.resize((width, height), resample=self.resample)

    def _finish(self, crop: np.ndarray, out: np.ndarray) -> None:
        """Per-crop resize and centre crop (uint8, HWC) written into `out`."""
        config = self._config
        height, width = crop.shape[:2]
        if config["do_resize"]:
            target = _resize_target(height, width, config["size"])
            if target != (height, width):
                crop = np.asarray(Image.fromarray(crop).resize((target[1], target[0]), resample=self.resample))
                height, width = target
        if config["do_center_crop"]:
            crop_h, crop_w = config["crop_size"]["height"], config["crop_size"]["width"]
            src_y, dst_y, len_y = _window(height, crop_h)
            src_x, dst_x, len_x = _window(width, crop_w)
            if (len_y, len_x) != (crop_h, crop_w):
                out[...] = 0
            out[dst_y : dst_y + len_y, dst_x : dst_x + len_x] = crop[src_y : src_y + len_y, src_x : src_x + len_x]
        else:
            out[...] = crop

    def _anyres(self, tile: Image.Image, out: np.ndarray) -> None:
        plan = self._plan
        grid_h, grid_w = plan.grid
        res_h, res_w = plan.grid_resized
        top, left = plan.grid_offset
        resized = np.asarray(self._resized(tile, res_h, res_w))
        if (res_h, res_w) == (grid_h, grid_w):
            canvas = resized
        else:
            canvas = np.zeros((grid_h, grid_w, 3), dtype=np.uint8)
            canvas[top : top + res_h, left : left + res_w] = resized
        if plan.base_size == (res_h, res_w):
            base = resized  # same source, size and filter: the same pixels
        else:
            base = np.asarray(self._resized(tile, *plan.base_size))
        for k, crop in enumerate(plan.crops):
            if crop.base:
                region = base
            else:
                region = canvas[crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
            self._finish(region, out[k])

    def _single(self, tile: Image.Image, out: np.ndarray) -> None:
        image = np.asarray(tile)
        if self._config.get("pad_to_square"):
            image = _pad_to_square(image, self.spec.image_mean)
        self._finish(image, out)


def _pad_to_square(image: np.ndarray, mean: list[float]) -> np.ndarray:
    """LLaVA-1.5's padding: centre the image on a square of the mean colour (truncated to uint8)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[...] = np.array([int(m * 255) for m in mean], dtype=np.uint8)
    if width > height:
        start = (side - height) // 2
        square[start : start + height] = image
    else:
        start = (side - width) // 2
        square[:, start : start + width] = image
    return square


def _lookup_table(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: list[float], std: list[float]
) -> np.ndarray:
    """float32 [3, 256]: the value transformers computes for each uint8 level of each channel.

    transformers rescales in float64 and casts to float32, then normalises in float32 with float32 mean and std;
    the same operations on the 256 levels give the same bits.
    """
    levels = np.arange(256, dtype=np.float64)
    values = (levels * rescale_factor).astype(np.float32) if do_rescale else levels.astype(np.float32)
    table = np.repeat(values[None, :], 3, axis=0)
    if do_normalize:
        mean32 = np.asarray(mean, dtype=np.float32)[:, None]
        std32 = np.asarray(std, dtype=np.float32)[:, None]
        table = (table - mean32) / std32
    return np.ascontiguousarray(table, dtype=np.float32)
