"""A picture of what the slide job embedded: the slide's thumbnail, its tissue mask, and the embedded tiles.

The tissue mask (where the tissue rule of `pue.slides.tiling` found tissue) is tinted green; each embedded tile is
outlined in blue at its level-0 footprint. The picture is at most `max_side` pixels on its longer side; tiles that
would be smaller than 3 pixels there are filled instead of outlined, so a slide of thousands of tiles still shows
which ones were taken. Written as PNG with no timestamp, so the same inputs give the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["render_tiles_overview", "write_png_atomically"]

TISSUE_TINT = (0, 170, 60)
TILE_COLOUR = (20, 60, 220)
_TINT_ALPHA = 0.35
_MIN_OUTLINE_SIDE = 3


def render_tiles_overview(
    thumbnail: Image.Image,
    scale: float,
    coords: np.ndarray,
    extent_level0: int,
    mask: np.ndarray | None = None,
    max_side: int = 2048,
) -> Image.Image:
    """`thumbnail` (`scale` thumbnail pixels per level-0 pixel) with `mask` tinted and the tiles at `coords`
    (level-0 top-left x, y, each `extent_level0` wide) outlined, resized to at most `max_side` pixels."""
    base = thumbnail.convert("RGB")
    factor = min(1.0, max_side / max(base.size))
    if factor < 1.0:
        base = base.resize((max(1, round(base.width * factor)), max(1, round(base.height * factor))), Image.BILINEAR)
    rgb = np.asarray(base, dtype=np.float32)
    if mask is not None and mask.any():
        shown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(base.size, Image.NEAREST)) > 0
        tint = np.asarray(TISSUE_TINT, np.float32)
        rgb[shown] = (1 - _TINT_ALPHA) * rgb[shown] + _TINT_ALPHA * tint
    picture = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    pixels_per_level0 = scale * base.width / thumbnail.width
    side = extent_level0 * pixels_per_level0
    for x, y in np.asarray(coords, np.float64).reshape(-1, 2):
        left, top = x * pixels_per_level0, y * pixels_per_level0
        box = (left, top, max(left, left + side - 1), max(top, top + side - 1))
        if side < _MIN_OUTLINE_SIDE:
            draw.rectangle(box, fill=TILE_COLOUR)
        else:
            draw.rectangle(box, outline=TILE_COLOUR, width=1 if side < 12 else 2)
    return picture


def write_png_atomically(picture: Image.Image, path: Path) -> None:
    """Write `picture` to `path` through a temporary name in the same folder: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        picture.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
