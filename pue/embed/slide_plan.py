"""Which tiles of a slide the job embeds, and the attributes that describe them in its features file.

Shared by both engines: the local one calls these in its process, the Ray engine in a task per slide.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pue.embed.inputs import SlideInput
from pue.slides.coords_files import find_coords_file, read_patch_coords
from pue.slides.readers import SlideReader
from pue.slides.resolution import Resolution, TileGeometry, tile_geometry
from pue.slides.tiling import SlideTiles, tissue_tiles

if TYPE_CHECKING:
    from pue.embed.job import JobSettings

__all__ = ["coords_attributes", "slide_tiles"]


def slide_tiles(reader: SlideReader, slide: SlideInput, settings: JobSettings) -> SlideTiles:
    """The slide's tissue tiles on the run's grid, or exactly the tiles of its `--coords-from` file."""
    if settings.coords_from is None:
        geometry = tile_geometry(
            reader, settings.patch_size, settings.resolution, settings.overlap, slide.mpp, settings.assume_mpp
        )
        return tissue_tiles(reader, geometry, settings.tissue_filter, settings.min_tissue)
    chosen = read_patch_coords(find_coords_file(settings.coords_from, slide.slide_id))
    native = tile_geometry(reader, settings.patch_size, Resolution(), 0, slide.mpp, settings.assume_mpp)
    downsample = chosen.patch_size_level0 / settings.patch_size
    geometry = replace(
        native,
        patch_size_level0=chosen.patch_size_level0,
        stride_level0=chosen.patch_size_level0,
        overlap=chosen.overlap,
        downsample=round(downsample, 6),
        level=reader.level_for(downsample),
        target_magnification=chosen.target_magnification
        or (None if native.level0_magnification is None else round(native.level0_magnification / downsample, 4)),
        target_mpp=None if native.level0_mpp is None else round(native.level0_mpp * downsample, 6),
    )
    return SlideTiles(coords=chosen.coords, geometry=geometry, grid_tiles=len(chosen.coords), min_tissue=0.0)


def coords_attributes(
    slide: SlideInput, reader: SlideReader, tiles: SlideTiles, settings: JobSettings
) -> dict[str, Any]:
    """The attributes of the `coords` dataset (TRIDENT's names, then pue's)."""
    geometry: TileGeometry = tiles.geometry
    return {
        "name": slide.slide_id,
        "patch_size": geometry.patch_size,
        "patch_size_level0": geometry.patch_size_level0,
        "level0_magnification": _number(geometry.level0_magnification),
        "target_magnification": _number(geometry.target_magnification),
        "overlap": geometry.overlap,
        "level0_width": int(reader.width),
        "level0_height": int(reader.height),
        "level0_mpp": geometry.level0_mpp,
        "patch_mpp": geometry.patch_mpp,
        "target_mpp": geometry.target_mpp,
        "mpp_source": geometry.mpp_source,
        "read_level": geometry.level,
        "min_tissue": tiles.min_tissue,
        "tissue_rule": "coords-from" if settings.coords_from is not None else "overlaps-tissue",
        "reader": reader.backend,
    }


def _number(value: float | None) -> float | int | None:
    """TRIDENT stores magnifications as integers: keep a whole number as one."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() else float(value)
