"""Loading user images into RGB PIL images, and bringing them to the bundle's tile size.

Only numpy and Pillow are used here: this module is shared by the lean runtime and by the export side's
PyTorch reference, so both see byte-identical tiles.

`load_image` is strict: every problem the caller can fix raises `pue.errors.InputError` naming the item's
index (and its path for files); nothing is skipped or repaired silently. The conversion rules are:

* **RGB** is used as is.
* **Transparency** (modes RGBA, LA, PA, premultiplied RGBa / La, and P / L / RGB images that carry a
  ``transparency`` key) is composited onto **white**, the colour of slide background, never dropped
  (dropping alpha would expose whatever the writer left under transparent pixels, often black).
  A fully transparent pixel becomes (255, 255, 255); an opaque one keeps its colour. This is also what
  transformers' own ``convert_to_rgb`` does to an RGBA image.
* **P** (palette) without transparency: its palette colours. **L** (grey): value v becomes (v, v, v).
  **1** (bilevel): 0 / 255 greys. **CMYK**, **YCbCr**, **LAB**, **HSV**: Pillow's own conversion to RGB
  (no ICC colour management; embedded ICC profiles are ignored here as they are by transformers).
* **16-bit grey** (I;16, I;16L, I;16B, I;16N) is scaled to 8 bit by rounding v / 257, the exact linear map
  of 0..65535 onto 0..255 (65535 -> 255, 32896 -> 128, 128 -> 0, 129 -> 1), then treated as L. Pillow's own
  conversion would clip everything above 255 to white instead. **I** (32-bit integer, which is how some
  writers and older Pillows store 16-bit PNGs) is taken as 16-bit data the same way when every value lies
  in 0..65535, and refused otherwise (the intended range cannot be known).
* **F** (32-bit float) images are refused: float pixels have no defined range (0..1, 0..255 or physical
  units), so any scaling would be a guess; convert them to 8 bit yourself.
* **EXIF orientation** is applied (``ImageOps.exif_transpose``) for files and for PIL images that still
  carry the tag, so a photo is embedded the way a viewer shows it. Patches cut from whole-slide images
  carry no such tag and are unaffected.
* Multi-frame files (GIF, multi-page TIFF) contribute their first frame. Whole-slide formats are not read
  here: a slide's level 0 trips Pillow's decompression-bomb guard, which stays on; cut patches instead.

Numpy arrays must be H x W x 3 uint8 (RGB, channels last); anything else is refused with what was found.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pue.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["check_tile", "fit_to_tile", "load_image"]

_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_PILLOW_TO_RGB_MODES = {"L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_ACCEPTED_HINT = "pass a file path, a PIL image or an H x W x 3 uint8 numpy array"


def load_image(item: Any, index: int) -> Image.Image:
    """Load one input item as an RGB `PIL.Image.Image` (see the module docstring for the conversion rules).

    `item` is a path (str or os.PathLike), a PIL image, or an H x W x 3 uint8 numpy array; `index` is its
    position in the caller's batch, used in error messages. The file is fully decoded here (so truncated
    files fail now, not later). An RGB PIL image without EXIF rotation is returned as is (not copied; it is
    never modified); PIL images the caller already holds are not re-checked against the decompression-bomb
    limit. Raises `InputError` for anything the caller can fix.
    """
    if isinstance(item, Image.Image):
        return _from_pil(item, index, getattr(item, "filename", None) or None)
    if isinstance(item, np.ndarray):
        return _from_array(item, index)
    if isinstance(item, (str, os.PathLike)):
        return _from_path(item, index)
    kind = f"{type(item).__module__}.{type(item).__qualname__}"
    hint = _ACCEPTED_HINT
    if kind.startswith("torch."):
        hint = "convert a tensor with .permute(1, 2, 0).numpy() to H x W x 3 uint8, or " + _ACCEPTED_HINT
    raise InputError(f"unsupported input type {kind}", index=index, hint=hint)


def fit_to_tile(image: Image.Image, tile_size: int) -> tuple[Image.Image, bool]:
    """Bring `image` to `tile_size` x `tile_size`; returns (tile, changed).

    An image already of that size is returned unchanged (the same object, changed False). Otherwise the
    shorter side is resized to `tile_size` with Pillow's BICUBIC, keeping the aspect ratio (the longer side
    becomes round(long * tile_size / short), rounded half to even, computed exactly in integers), then the
    centre `tile_size` x `tile_size` square is cropped with left = (width - tile_size) // 2 and
    top = (height - tile_size) // 2. The runtime and the export side's reference both call this function.
    """
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size <= 0:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    tile_size = int(tile_size)
    width, height = image.size
    if (width, height) == (tile_size, tile_size):
        return image, False
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot fit an empty {width}x{height} image to a tile")
    short, long = (width, height) if width <= height else (height, width)
    new_long = _round_half_even(long * tile_size, short)
    new_size = (tile_size, new_long) if width <= height else (new_long, tile_size)
    resized = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    left = (new_size[0] - tile_size) // 2
    top = (new_size[1] - tile_size) // 2
    return resized.crop((left, top, left + tile_size, top + tile_size)), True


def load_tiles(images: Sequence[Any], tile_size: int, first_index: int = 0) -> list[Image.Image]:
    """Load every image (`load_image`) and bring it to the tile size (`fit_to_tile`); says how many changed."""
    tiles = []
    resized = 0
    for offset, item in enumerate(images):
        tile, changed = fit_to_tile(load_image(item, first_index + offset), tile_size)
        tiles.append(tile)
        resized += int(changed)
    if resized:
        log.info("brought %d of %d images to the %d px tile size", resized, len(tiles), tile_size)
    return tiles


def _round_half_even(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def _from_path(item: str | os.PathLike, index: int) -> Image.Image:
    path = os.fsdecode(os.fspath(item))
    if not path:
        raise InputError("empty path", index=index, hint=_ACCEPTED_HINT)
    if not os.path.exists(path):
        raise InputError("file not found", index=index, path=path)
    if os.path.isdir(path):
        raise InputError("is a directory, not an image file", index=index, path=path)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                rgb = _to_rgb(opened, index, path)
                # closing the file destroys the image core of `opened`: never hand that object out
                return rgb.copy() if rgb is opened else rgb
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"refused by Pillow's decompression-bomb guard: {exc}",
            index=index,
            path=path,
            hint="cut patches from large images (whole slides: openslide) and pass those",
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise InputError("is not an image file Pillow can read", index=index, path=path) from exc
    except PermissionError as exc:
        raise InputError(f"cannot be read: {exc.strerror or exc}", index=index, path=path) from exc
    except Exception as exc:  # any decoder failure on the caller's file: truncated, corrupt, unsupported
        raise InputError(
            f"could not be decoded ({type(exc).__name__}: {exc}); the file is truncated or corrupt",
            index=index,
            path=path,
        ) from exc


def _from_pil(image: Image.Image, index: int, path: str | None) -> Image.Image:
    try:
        image.load()
    except Exception as exc:  # lazily opened by the caller: truncated file, closed image, ...
        raise InputError(
            f"the PIL image could not be decoded ({type(exc).__name__}: {exc})", index=index, path=path
        ) from exc
    return _to_rgb(image, index, path)


def _from_array(array: np.ndarray, index: int) -> Image.Image:
    found = f"found shape {tuple(array.shape)} dtype {array.dtype}"
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
            what = "contains NaN or Inf values and is a float array" if not np.all(np.isfinite(array)) else "is float"
            raise InputError(
                f"array {what} ({found}); images must be H x W x 3 uint8",
                index=index,
                hint="convert values in 0..1 with (x * 255).round().astype(np.uint8)",
            )
        raise InputError(f"array must be H x W x 3 uint8, {found}", index=index, hint=_ACCEPTED_HINT)
    if array.ndim != 3 or array.shape[2] != 3:
        hint = _ACCEPTED_HINT
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[2] != 3:
            hint = "channels-first arrays are not accepted: pass array.transpose(1, 2, 0)"
        elif array.ndim == 3 and array.shape[2] == 4:
            hint = "RGBA arrays are not accepted: composite them onto white or pass a PIL RGBA image"
        elif array.ndim == 2:
            hint = "grey arrays are not accepted: pass np.stack([a, a, a], axis=-1) or a PIL 'L' image"
        raise InputError(f"array must be H x W x 3 uint8, {found}", index=index, hint=hint)
    if array.size == 0:
        raise InputError(f"array is empty ({found})", index=index)
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image, index: int, path: str | None) -> Image.Image:
    """Convert a decoded image to RGB; an RGB input without EXIF rotation is returned as is (never modified)."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InputError(f"image is empty ({width}x{height} pixels)", index=index, path=path)
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # unreadable EXIF block: the pixels are fine, there is just no orientation to apply
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "F":
        raise InputError(
            "floating-point (mode F) images are not accepted: their value range is undefined",
            index=index,
            path=path,
            hint="convert to 8-bit RGB first",
        )
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _sixteen_bit_to_rgb(image, index, path)
    if mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        return _composite_on_white(image)
    if mode == "RGB":
        return image
    if mode in _PILLOW_TO_RGB_MODES:
        return image.convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"image mode {mode!r} cannot be converted to RGB ({exc})", index=index, path=path) from exc


def _composite_on_white(image: Image.Image) -> Image.Image:
    if image.mode == "La":  # Pillow converts premultiplied La only to LA
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image, index: int, path: str | None) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "I":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise InputError(
                f"32-bit integer (mode I) image has values {low}..{high}, outside the 16-bit range 0..65535",
                index=index,
                path=path,
                hint="convert it to 8-bit RGB first",
            )
    grey = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def check_tile(tile: Any, index: int, tile_size: int) -> None:
    """An RGB PIL image of tile_size x tile_size, or an InputError naming item `index` and what to do."""
    if not isinstance(tile, Image.Image):
        raise InputError(
            f"expected a PIL image tile, got {type(tile).__name__}", index=index, hint="load it with load_image"
        )
    if tile.mode != "RGB":
        raise InputError(
            f"expected an RGB tile, got mode {tile.mode!r}", index=index, hint="load it with load_image"
        )
    if tile.size != (tile_size, tile_size):
        raise InputError(
            f"tile is {tile.size[0]}x{tile.size[1]} px, the bundle takes {tile_size}x{tile_size}",
            index=index,
            hint="bring it to the tile size with fit_to_tile",
        )
