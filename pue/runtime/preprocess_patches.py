"""Native-resolution patch preprocessing (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), in numpy + Pillow.

transformers' ``Qwen2VLImageProcessorPil`` resizes an image to a size whose sides are multiples of
``patch_size × merge_size`` with its pixel count inside [min_pixels, max_pixels] (``smart_resize``), rescales
and normalises it, and flattens it into ``grid_h × grid_w`` patches of ``C × temporal_patch_size × P × P``
values, ordered by 2×2 merge block (the vision tower's merger reads four consecutive patches), each patch's
frame repeated ``temporal_patch_size`` times. For a square tile of the bundle's tile size the resized size, the
grid and so the token count (``grid_h × grid_w / merge_size²``) are fixed: `preprocessing_for_patches` derives
them from the processor config, never assumes them.

The resize goes through Pillow on uint8 RGB data with the processor's filter, exactly as transformers does, and
rescale + normalise use the same per-channel lookup table as the LLaVA preprocessor, so pixel values match bit
for bit. Only numpy, Pillow, `pue.bundle` and `pue.errors` are imported.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from pue.bundle import ImagePreprocessing
from pue.errors import BundleError, CheckpointError
from pue.runtime.images import check_tile

PATCHES = "patches"
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen2VLImageProcessor's class defaults (a key missing from the config takes these, as transformers does).
_DEFAULTS: dict[str, Any] = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "resample": int(Image.Resampling.BICUBIC),
    "rescale_factor": 1 / 255,
    "image_mean": _CLIP_MEAN,
    "image_std": _CLIP_STD,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) Qwen2-VL's processor resizes to: sides multiples of `factor`, pixels within the bounds,
    aspect ratio kept as closely as possible (the same arithmetic as transformers', Python's rounding included)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pre_resized_size(tile_size: int, pre_resize: dict[str, Any] | None) -> tuple[int, int]:
    """(height, width) of a square tile after a recipe's own resize before the processor (HOMIE: factor 28,
    4·28² to 625·28² pixels, as `qwen_vl_utils.fetch_image` does it); the tile's size without one."""
    if not pre_resize:
        return tile_size, tile_size
    try:
        return smart_resize(
            tile_size,
            tile_size,
            int(pre_resize["factor"]),
            int(pre_resize["min_pixels"]),
            int(pre_resize["max_pixels"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the recipe's image_resize {pre_resize!r} is not factor, min_pixels, max_pixels: {exc}"
        ) from exc


def preprocessing_for_patches(
    processor_config: dict[str, Any], tile_size: int, pre_resize: dict[str, Any] | None = None
) -> ImagePreprocessing:
    """The bundle's `ImagePreprocessing` of a Qwen2-VL-style image processor for square tiles of `tile_size`.

    `processor_config` is the image processor's dict (`preprocessor_config.json`, or `processor_config.json`'s
    ``image_processor``); ``min_pixels`` / ``max_pixels`` are read from those keys or from ``size``
    (``shortest_edge`` / ``longest_edge``, transformers 5's form). The resolved settings and the fixed layout of
    one tile (``resized``, ``grid_thw``, ``patches``, ``patch_dim``, ``tokens_per_image``) are kept in
    ``processor_config``. `pre_resize` is a recipe's own resize before the processor's (``image_resize``: HOMIE's
    factor-28 rule); kept as ``pre_resize`` with the size it gives, from which the processor then resizes.
    """
    if not isinstance(processor_config, dict):
        raise CheckpointError(f"the image processor config must be a dict, got {type(processor_config).__name__}")
    size = processor_config.get("size") if isinstance(processor_config.get("size"), dict) else {}
    merged = {key: processor_config.get(key) for key in _DEFAULTS}
    merged["min_pixels"] = processor_config.get("min_pixels") or size.get("shortest_edge")
    merged["max_pixels"] = processor_config.get("max_pixels") or size.get("longest_edge")
    resolved = {key: (merged[key] if merged[key] is not None else default) for key, default in _DEFAULTS.items()}
    for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"the image processor's {key} {value!r} is not a positive integer")
    factor = resolved["patch_size"] * resolved["merge_size"]
    first_h, first_w = pre_resized_size(tile_size, pre_resize)
    if resolved["do_resize"]:
        try:
            height, width = smart_resize(first_h, first_w, factor, resolved["min_pixels"], resolved["max_pixels"])
        except ValueError as exc:
            raise CheckpointError(f"the image processor cannot resize {tile_size}px tiles: {exc}") from exc
    else:
        height, width = first_h, first_w
    if height % factor or width % factor:
        raise CheckpointError(
            f"{tile_size}px tiles stay {width}x{height}px, not a multiple of patch_size × merge_size = {factor}",
            f"choose a tile size that is a multiple of {factor}, or let the processor resize (do_resize)",
        )
    grid_h, grid_w = height // resolved["patch_size"], width // resolved["patch_size"]
    patch = resolved["patch_size"]
    resolved.update(
        image_processor_type=str(processor_config.get("image_processor_type") or "Qwen2VLImageProcessor"),
        resized=[height, width],
        grid_thw=[1, grid_h, grid_w],
        patches=grid_h * grid_w,
        patch_dim=3 * resolved["temporal_patch_size"] * patch * patch,
        tokens_per_image=grid_h * grid_w // resolved["merge_size"] ** 2,
    )
    if pre_resize:
        resolved["pre_resize"] = {
            **{key: int(pre_resize[key]) for key in ("factor", "min_pixels", "max_pixels")},
            "resized": [first_h, first_w],
            "resample": int(Image.Resampling.BICUBIC),  # Pillow's default for RGB, as qwen_vl_utils calls it
        }
    return ImagePreprocessing(
        kind=PATCHES,
        tile_size=int(tile_size),
        crop_size=height,
        num_crops=1,
        image_mean=[float(v) for v in resolved["image_mean"]],
        image_std=[float(v) for v in resolved["image_std"]],
        rescale_factor=float(resolved["rescale_factor"]),
        resample=int(resolved["resample"]),
        processor_config=resolved,
    )


class PatchPreprocessor:
    """RGB tiles of the bundle's tile size → float32 ``[N, patches, patch_dim]``, as the vision graph takes them."""

    REQUIRED = ("resized", "patch_size", "temporal_patch_size", "merge_size", "patches", "patch_dim", "do_rescale")

    def __init__(self, spec: ImagePreprocessing, lookup_table: np.ndarray) -> None:
        config = dict(spec.processor_config)
        missing = [key for key in self.REQUIRED if key not in config]
        if missing:
            raise BundleError(
                f"the bundle's patch preprocessing lacks {', '.join(missing)}", "rebuild the bundle with pue-export"
            )
        self.spec = spec
        self.tile_size = int(spec.tile_size)
        self.height, self.width = (int(v) for v in config["resized"])
        self.patch = int(config["patch_size"])
        self.temporal = int(config["temporal_patch_size"])
        self.merge = int(config["merge_size"])
        self.patches = int(config["patches"])
        self.patch_dim = int(config["patch_dim"])
        if (self.height // self.patch) * (self.width // self.patch) != self.patches:
            raise BundleError(f"the bundle's patch preprocessing is inconsistent: {config}", "rebuild the bundle")
        self.resample = int(spec.resample)
        pre = config.get("pre_resize") or None
        self.pre_resize = None if pre is None else (tuple(int(v) for v in pre["resized"]), int(pre["resample"]))
        self._lut = lookup_table

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.patches, self.patch_dim)

    def __call__(self, tiles: list[Image.Image]) -> np.ndarray:
        out = np.empty((len(tiles), self.patches, self.patch_dim), dtype=np.float32)
        for index, tile in enumerate(tiles):
            self._check_tile(tile, index)
            if self.pre_resize is not None:  # the recipe's own resize first (HOMIE), then the processor's
                (height, width), resample = self.pre_resize
                tile = tile if tile.size == (width, height) else tile.resize((width, height), resample=resample)
            resized = (
                tile
                if tile.size == (self.width, self.height)
                else tile.resize((self.width, self.height), resample=self.resample)
            )
            raw = np.asarray(resized)
            planes = np.stack([self._lut[c][raw[:, :, c]] for c in range(3)])  # [C, H, W] float32
            out[index] = self._patchify(planes)
        return out

    def _patchify(self, image: np.ndarray) -> np.ndarray:
        channels = image.shape[0]
        grid_h, grid_w, merge, patch = self.height // self.patch, self.width // self.patch, self.merge, self.patch
        blocks = image.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], self.temporal, patch, patch))
        return frames.reshape(self.patches, self.patch_dim)

    def _check_tile(self, tile: Any, index: int) -> None:
        check_tile(tile, index, self.tile_size)
