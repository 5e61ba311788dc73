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

A third kind, ``"patches"`` (Qwen2-VL / Qwen2.5-VL: the tile resized to multiples of patch × merge and
flattened into patches, ``[N, patches, patch_dim]``), lives in `preprocess_patches`; this class hands it over.

Config resolution (`preprocessing_from_config`, re-exported here) lives in `preprocess_config`, the crop
geometry both share in `preprocess_geometry`. Only numpy, Pillow, `pue.bundle` and `pue.errors` are imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from pue.bundle import ImagePreprocessing
from pue.errors import BundleError
from pue.runtime.images import check_tile
from pue.runtime.preprocess_config import preprocessing_from_config
from pue.runtime.preprocess_geometry import KINDS, crop_window, make_plan, resize_target, select_best_resolution
from pue.runtime.preprocess_patches import PATCHES, PatchPreprocessor

__all__ = ["ImagePreprocessor", "preprocessing_from_config", "select_best_resolution"]


class ImagePreprocessor:
    """Turns RGB tiles of the bundle's tile size into the vision graph's `pixel_values`.

    ``preprocessor(tiles)`` takes a list of RGB PIL images of ``tile_size`` x ``tile_size`` (bring them there
    with `pue.runtime.images.load_image` and `fit_to_tile`) and returns float32
    ``[N, num_crops, 3, S, S]`` for ``kind="anyres"`` or ``[N, 3, S, S]`` for ``kind="single"``, equal to what
    transformers' PIL image processor computes for the same tiles.
    """

    def __init__(self, spec: ImagePreprocessing) -> None:
        self._patches: PatchPreprocessor | None = None
        if spec.kind == PATCHES:  # Qwen2-VL-style native-resolution patches (`preprocess_patches`)
            self.spec, self.kind, self.tile_size = spec, spec.kind, int(spec.tile_size)
            config = spec.processor_config
            lut = _lookup_table(
                bool(config.get("do_rescale", True)),
                spec.rescale_factor,
                bool(config.get("do_normalize", True)),
                spec.image_mean,
                spec.image_std,
            )
            self._patches = PatchPreprocessor(spec, lut)
            return
        if spec.kind not in KINDS:
            kinds = ", ".join((*KINDS, PATCHES))
            raise BundleError(f"unknown image preprocessing kind {spec.kind!r}", f"expected one of {kinds}")
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
            self._plan = make_plan(self.kind, config, self.tile_size, self.tile_size)
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
        if self._patches is not None:
            return self._patches.output_shape
        size = self.crop_size
        return (self.num_crops, 3, size, size) if self.kind == "anyres" else (3, size, size)

    def __call__(self, tiles: list[Image.Image]) -> np.ndarray:
        if self._patches is not None:
            return self._patches(tiles)
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
        check_tile(tile, index, self.tile_size)

    def _resized(self, image: Image.Image, height: int, width: int) -> Image.Image:
        if image.size == (width, height):
            return image  # Pillow returns an unchanged copy for a same-size resize
        return image.resize((width, height), resample=self.resample)

    def _finish(self, crop: np.ndarray, out: np.ndarray) -> None:
        """Per-crop resize and centre crop (uint8, HWC) written into `out`."""
        config = self._config
        height, width = crop.shape[:2]
        if config["do_resize"]:
            target = resize_target(height, width, config["size"])
            if target != (height, width):
                crop = np.asarray(Image.fromarray(crop).resize((target[1], target[0]), resample=self.resample))
                height, width = target
        if config["do_center_crop"]:
            crop_h, crop_w = config["crop_size"]["height"], config["crop_size"]["width"]
            src_y, dst_y, len_y = crop_window(height, crop_h)
            src_x, dst_x, len_x = crop_window(width, crop_w)
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
