"""Which tiles of a slide are embedded: a grid over level 0, kept where it overlaps tissue.

The grid starts at (0, 0) and steps by `stride_level0` (the tile's level-0 side minus the overlap); only tiles
that lie wholly inside the slide are on it. Every tile of the grid is considered: there is no cap on their
number.

The tissue rule. A tissue mask is computed once per slide on a thumbnail (`pue.slides.tissue`: HSV saturation
above Otsu's threshold clipped to [0.04, 0.06], neither near-white nor near-black), sized so that a tile spans at
least 4 thumbnail pixels; isolated mask pixels are dropped (a pixel stays tissue when at least 5 of its 3 x 3
neighbourhood are). A tile's tissue fraction is the share of its thumbnail footprint that is tissue. By default a
tile is kept when that fraction is above zero, i.e. it overlaps tissue, as TRIDENT keeps tiles that intersect its
tissue contours; `min_tissue=F` keeps only tiles whose fraction is at least F.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pue.errors import PueError
from pue.slides.readers import SlideReader
from pue.slides.resolution import TileGeometry
from pue.slides.tissue import TissueFilter

__all__ = ["SlideTiles", "grid_coords", "tile_footprints", "tile_fractions", "tissue_tiles"]

_MIN_THUMBNAIL_SIDE = 1024
_MAX_THUMBNAIL_SIDE = 8192
_THUMBNAIL_PIXELS_PER_STRIDE = 4


@dataclass
class SlideTiles:
    """The tiles chosen on a slide, level-0 top-left corners in grid order (row by row), and how they were chosen."""

    coords: np.ndarray  # int64 (N, 2): x, y
    geometry: TileGeometry
    grid_tiles: int
    min_tissue: float
    saturation_threshold: float | None = None
    mask: np.ndarray | None = field(default=None, repr=False)  # the thumbnail's tissue mask
    mask_scale: float = 1.0  # thumbnail pixels per level-0 pixel
    thumbnail: Any = field(default=None, repr=False)  # the PIL thumbnail the mask was computed on

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def grid_coords(width: int, height: int, extent: int, stride: int) -> np.ndarray:
    """int64 (N, 2) top-left `x, y` of every `extent`-sized tile stepping by `stride` that lies inside the slide."""
    if extent <= 0 or stride <= 0:
        raise PueError(f"tile side and stride must be positive, got {extent} and {stride}")
    xs = np.arange(0, width - extent + 1, stride, dtype=np.int64)
    ys = np.arange(0, height - extent + 1, stride, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def tile_fractions(mask: np.ndarray, coords: np.ndarray, extent: int, scale: float) -> np.ndarray:
    """Share of each tile's footprint on `mask` (thumbnail pixels per level-0 pixel: `scale`) that is True."""
    if coords.shape[0] == 0:
        return np.zeros(0, np.float64)
    height, width = mask.shape
    integral = np.zeros((height + 1, width + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    x0, y0, x1, y1 = tile_footprints(coords, extent, scale, width, height)
    counts = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return counts / ((x1 - x0) * (y1 - y0))


def tile_footprints(
    coords: np.ndarray, extent: int, scale: float, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each tile's footprint on a `width` x `height` thumbnail (`scale` thumbnail pixels per level-0 pixel): int64
    x0, y0, x1, y1 (exclusive), at least one pixel each, clipped to the thumbnail."""
    x0 = np.clip(np.floor(coords[:, 0] * scale).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.floor(coords[:, 1] * scale).astype(np.int64), 0, height - 1)
    x1 = np.clip(np.maximum(x0 + 1, np.ceil((coords[:, 0] + extent) * scale).astype(np.int64)), 1, width)
    y1 = np.clip(np.maximum(y0 + 1, np.ceil((coords[:, 1] + extent) * scale).astype(np.int64)), 1, height)
    return x0, y0, x1, y1


def tissue_tiles(
    reader: SlideReader,
    geometry: TileGeometry,
    tissue_filter: TissueFilter | None = None,
    min_tissue: float = 0.0,
) -> SlideTiles:
    """The grid tiles of `reader` that pass the tissue rule (module docstring); none on an all-glass slide."""
    if not 0.0 <= min_tissue <= 1.0:
        raise PueError(f"minimum tissue fraction must be in [0, 1], got {min_tissue!r}")
    tissue_filter = tissue_filter or TissueFilter()
    extent, stride = geometry.patch_size_level0, geometry.stride_level0
    grid = grid_coords(reader.width, reader.height, extent, stride)
    if grid.shape[0] == 0:
        raise PueError(
            f"slide {reader.path} is {reader.width} x {reader.height} px, smaller than one tile ({extent} px of "
            f"level 0 for {geometry.patch_size} px tiles)"
        )
    side = thumbnail_side(reader.width, reader.height, stride)
    thumbnail, scale = reader.thumbnail(side)
    rgb = np.asarray(thumbnail.convert("RGB") if thumbnail.mode != "RGB" else thumbnail)
    threshold = tissue_filter.threshold(rgb)
    mask = despeckle(tissue_filter.mask(rgb, threshold))
    fractions = tile_fractions(mask, grid, extent, scale)
    keep = fractions >= min_tissue if min_tissue > 0 else fractions > 0
    return SlideTiles(
        coords=np.ascontiguousarray(grid[keep]),
        geometry=geometry,
        grid_tiles=int(grid.shape[0]),
        min_tissue=float(min_tissue),
        saturation_threshold=round(float(threshold), 4),
        mask=mask,
        mask_scale=scale,
        thumbnail=thumbnail,
    )


def thumbnail_side(width: int, height: int, stride: int) -> int:
    """Longest thumbnail side: a grid step spans at least 4 thumbnail pixels, within [1024, 8192] (or the slide)."""
    wanted = math.ceil(max(width, height) / stride * _THUMBNAIL_PIXELS_PER_STRIDE)
    return min(max(width, height), max(_MIN_THUMBNAIL_SIDE, min(wanted, _MAX_THUMBNAIL_SIDE)))


def despeckle(mask: np.ndarray) -> np.ndarray:
    """Keep a mask pixel when at least 5 of its 3 x 3 neighbourhood (itself included) are set."""
    padded = np.pad(mask.astype(np.uint8), 1)
    height, width = mask.shape
    counts = sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))
    return mask & (counts >= 5)
