"""Calibration patches from a whole-slide image, tiled by `pue.slides` and checked strictly for tissue.

The slide job keeps every tile that overlaps tissue; calibration wants clean tissue only, so a tile here passes two
checks: its footprint on the thumbnail mask is at least half the filter's minimum tissue fraction (which spares
reading glass tiles), then the tile itself, read at full size, passes `TissueFilter.accepts`. The full-size check is
bounded by `max_tiles` (spread evenly over the slide), which calibration.json records as `checked_tiles`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pue.calibration.sources import Patch, PatchSource, Progress
from pue.errors import PueError
from pue.slides import readers
from pue.slides.resolution import Resolution, tile_geometry
from pue.slides.tiling import grid_coords, thumbnail_side, tile_fractions
from pue.slides.tissue import TissueFilter

__all__ = ["SlideSource"]


class SlideSource(PatchSource):
    """Tissue tiles of a whole-slide image on a grid (stride = tile), at a patch size and magnification or µm/px.

    With neither `magnification` nor `mpp` the slide is tiled at its native resolution. Tiles are returned
    as `patch_size` x `patch_size` images, read from the pyramid level closest above the target resolution
    and resized when needed. Upsampling is refused. At most `max_tiles` thumbnail-selected tiles (spread
    evenly over the slide) get the full-size check, which bounds the reading time on large slides.
    `reader` is "auto" (openslide when installed and able, else Pillow), "openslide" or "pillow".
    """

    kind = "slide"

    def __init__(
        self,
        path: Path,
        patch_size: int = 224,
        magnification: float | None = None,
        mpp: float | None = None,
        tissue_filter: TissueFilter | None = None,
        max_tiles: int = 2048,
        reader: str = "auto",
    ) -> None:
        self.resolution = Resolution(magnification=magnification, mpp=mpp)
        self.path = Path(path)
        self.name = str(self.path)
        self.patch_size = patch_size
        self.magnification = magnification
        self.mpp = mpp
        self.tissue_filter = tissue_filter or TissueFilter()
        self.max_tiles = max_tiles
        self.reader = readers.open_slide(self.path, reader)
        self.geometry = tile_geometry(self.reader, patch_size, self.resolution)
        self.downsample = self.geometry.downsample
        self.extent = self.geometry.patch_size_level0
        self.patch_mpp = self.geometry.patch_mpp if self.reader.mpp is not None else None
        self.stats: dict[str, Any] = {}

    def _scan(self, progress: Progress | None) -> list[Patch]:
        extent = self.extent
        grid = grid_coords(self.reader.width, self.reader.height, extent, extent)
        if grid.shape[0] == 0:
            raise PueError(
                f"slide {self.path} is {self.reader.width} x {self.reader.height} px, smaller than one tile ({extent} "
                f"px of level 0 for {self.patch_size} px patches at {self.resolution.text()})"
            )
        thumbnail, scale = self.reader.thumbnail(thumbnail_side(self.reader.width, self.reader.height, extent))
        rgb = np.asarray(thumbnail)
        threshold = self.tissue_filter.threshold(rgb)
        fractions = tile_fractions(self.tissue_filter.mask(rgb, threshold), grid, extent, scale)
        # A lenient first pass: the thumbnail only spares reading glass tiles; each tile is checked at full size.
        first_pass = [tuple(int(v) for v in xy) for xy in grid[fractions >= self.tissue_filter.min_tissue_fraction / 2]]
        checked = _evenly(first_pass, self.max_tiles)
        patches = []
        for done, (x, y) in enumerate(checked, start=1):
            tile = self.reader.read(x, y, extent, self.patch_size)
            if self.tissue_filter.accepts(tile, threshold):
                patches.append(
                    Patch(
                        source=self.name,
                        x=x,
                        y=y,
                        size=self.patch_size,
                        level=self.geometry.level,
                        mpp=self.patch_mpp,
                        extent=extent,
                        slide=self.reader,
                    )
                )
            if progress is not None:
                progress(done, len(checked))
        self.stats = {
            "grid_tiles": int(grid.shape[0]),
            "thumbnail_tissue_tiles": len(first_pass),
            "checked_tiles": len(checked),
            "tissue_tiles": len(patches),
            "saturation_threshold": round(threshold, 4),
        }
        if not patches:
            raise PueError(
                f"no tissue found in slide {self.path}: none of its {grid.shape[0]} tiles ({self.patch_size} px at "
                f"{self.resolution.text()}) passed the tissue filter (saturation threshold {threshold:.3f}; "
                f"{self.tissue_filter.describe()})",
                hint="pass a slide with tissue on it, or a folder of patches",
            )
        return patches

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "reader": self.reader.backend,
            "dimensions": [self.reader.width, self.reader.height],
            "native_mpp": self.reader.mpp,
            "native_magnification": self.reader.magnification,
            "patch_size": self.patch_size,
            "magnification": self.magnification,
            "mpp": self.mpp,
            "patch_mpp": self.patch_mpp,
            "downsample": round(self.downsample, 6),
            "extent": self.extent,
            "max_tiles": self.max_tiles,
            "tissue_filter": self.tissue_filter.to_dict(),
            **self.stats,
        }


def _evenly(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else items[:1]
