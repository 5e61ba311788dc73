"""From a target magnification or µm/px to the level-0 square a tile covers.

Pathology tools name a tiling by magnification and patch size, never by pyramid level. 10x is taken as
1 µm/px (TRIDENT's convention), so 20x is 0.5 µm/px and 40x 0.25 µm/px. A slide's own resolution is its
µm/px when the file records it (the measured value, e.g. 0.2527), else its objective power.

`patch_size_level0` follows TRIDENT for a magnification target: the nominal ratio of magnifications,
`round(patch_size × scan magnification ÷ target)`, where the scan's magnification is its recorded objective power,
else its µm/px as a standard power (5, 10, 20, 40, 60, 80x: the nearest within 10 %, else 10 ÷ µm/px). So 224 px at
20x of a 0.2527 µm/px "40x" scan covers 448 level-0 pixels, as in TRIDENT's files. For a µm/px target it is the
measured ratio, `round(patch_size × target µm/px ÷ scan µm/px)`. Either way the scan's measured µm/px and the
tiles' effective µm/px (`patch_mpp`) are recorded. A target within 10 % of the scan's own resolution reads native
pixels (20x of a 0.499 µm/px scan is read 1:1). Upsampling is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pue.errors import PueError
from pue.slides.readers import SlideReader

__all__ = ["Resolution", "TileGeometry", "nominal_magnification", "tile_geometry"]

# A target within 10 % of the native resolution reads the native pixels: 20x of a 0.499 µm/px scan is 20x.
_RESOLUTION_TOLERANCE = 0.1
_MPP_AT_1X = 10.0  # 10x = 1 µm/px
_STANDARD_POWERS = (5.0, 10.0, 20.0, 40.0, 60.0, 80.0)


@dataclass(frozen=True)
class Resolution:
    """A tiling target: a magnification or a µm/px (at most one; neither: the scan's native resolution)."""

    magnification: float | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.magnification is not None and self.mpp is not None:
            raise PueError("give either a magnification or a µm/px target for slides, not both")
        for label, value in (("magnification", self.magnification), ("µm/px", self.mpp)):
            if value is not None and not value > 0:
                raise PueError(f"{label} must be positive, got {value!r}")

    @property
    def native(self) -> bool:
        return self.magnification is None and self.mpp is None

    def text(self) -> str:
        if self.magnification is not None:
            return f"{self.magnification:g}x"
        if self.mpp is not None:
            return f"{self.mpp:g} µm/px"
        return "native resolution"


@dataclass(frozen=True)
class TileGeometry:
    """How a slide is tiled: the tile as embedded and the level-0 square it covers."""

    patch_size: int  # side of the tile as read (pixels at the target resolution)
    patch_size_level0: int  # side of the square it covers, in level-0 pixels
    stride_level0: int  # grid step in level-0 pixels (patch_size_level0 minus the overlap)
    overlap: int  # overlap of neighbouring tiles, in target pixels
    downsample: float  # level-0 pixels per target pixel (1.0 when read at native resolution)
    level: int  # the pyramid level regions are read from
    level0_mpp: float | None  # the slide's µm/px (measured, assumed or from its magnification)
    mpp_source: str  # "file", "csv", "assumed", "magnification" or "unknown"
    level0_magnification: float | None  # the scan's objective power, or 10 / µm/px
    target_magnification: float | None  # asked for, or implied by a µm/px target
    target_mpp: float | None  # asked for, or implied by a magnification target

    @property
    def patch_mpp(self) -> float | None:
        """µm/px of the tiles as embedded (the measured effective resolution)."""
        if self.level0_mpp is None:
            return None
        return round(self.level0_mpp * self.patch_size_level0 / self.patch_size, 6)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "patch_mpp": self.patch_mpp}


def tile_geometry(
    reader: SlideReader,
    patch_size: int,
    resolution: Resolution = Resolution(),
    overlap: int = 0,
    mpp_override: float | None = None,
    assume_mpp: float | None = None,
) -> TileGeometry:
    """The tiling of `reader` for `patch_size` px tiles at `resolution`, neighbours overlapping by `overlap` px.

    `mpp_override` (a CSV's mpp column) wins over the file's metadata; `assume_mpp` is used only when the file
    records neither µm/px nor magnification. Without either, a slide without resolution metadata is refused for a
    magnification or µm/px target: a wrong magnification silently ruins every downstream model.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
        raise PueError(f"patch size must be a positive integer, got {patch_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < patch_size:
        raise PueError(f"overlap must be an integer in [0, patch size {patch_size}), got {overlap!r}")
    for label, value in (("mpp override", mpp_override), ("assumed µm/px", assume_mpp)):
        if value is not None and not value > 0:
            raise PueError(f"{label} must be positive, got {value!r}")
    level0_mpp, source = _slide_mpp(reader, mpp_override, assume_mpp)
    magnification = reader.magnification if source in ("file", "magnification") else None
    if magnification is None and level0_mpp is not None:
        magnification = nominal_magnification(level0_mpp)
    if resolution.native:
        downsample = 1.0
        target_mpp, target_mag = level0_mpp, magnification
    else:
        target_mpp = resolution.mpp if resolution.mpp is not None else _MPP_AT_1X / float(resolution.magnification)
        target_mag = resolution.magnification if resolution.magnification is not None else _MPP_AT_1X / target_mpp
        if level0_mpp is None:
            raise PueError(
                f"slide {reader.path} records neither its µm/px nor its magnification, so {resolution.text()} cannot "
                "be found",
                hint="give the scan's resolution with --assume-mpp X (or an mpp column in the CSV) if you know it; "
                "a wrong value silently ruins every downstream model",
            )
        if resolution.magnification is not None and magnification is not None:
            downsample = magnification / resolution.magnification
        else:
            downsample = target_mpp / level0_mpp
        if abs(downsample - 1.0) <= _RESOLUTION_TOLERANCE:
            downsample = 1.0
        elif downsample < 1.0:
            raise PueError(
                f"slide {reader.path} is scanned at {level0_mpp:g} µm/px ({magnification:g}x); {resolution.text()} "
                "would need upsampling",
                hint="ask for a magnification at or below the scan's",
            )
    extent = round(patch_size * downsample)
    stride = extent - round(overlap * downsample)
    return TileGeometry(
        patch_size=patch_size,
        patch_size_level0=extent,
        stride_level0=max(1, stride),
        overlap=overlap,
        downsample=round(downsample, 6),
        level=reader.level_for(extent / patch_size),
        level0_mpp=level0_mpp,
        mpp_source=source,
        level0_magnification=magnification,
        target_magnification=None if target_mag is None else round(target_mag, 4),
        target_mpp=None if target_mpp is None else round(target_mpp, 6),
    )


def nominal_magnification(mpp: float) -> float:
    """The standard objective power nearest 10 / µm/px (within 10 %), else 10 / µm/px itself."""
    exact = _MPP_AT_1X / mpp
    nearest = min(_STANDARD_POWERS, key=lambda power: abs(power - exact))
    return nearest if abs(nearest - exact) <= _RESOLUTION_TOLERANCE * nearest else round(exact, 2)


def _slide_mpp(
    reader: SlideReader, mpp_override: float | None, assume_mpp: float | None
) -> tuple[float | None, str]:
    if mpp_override is not None:
        return float(mpp_override), "csv"
    if reader.mpp is not None:
        return float(reader.mpp), "file"
    if reader.magnification is not None:
        return _MPP_AT_1X / float(reader.magnification), "magnification"
    if assume_mpp is not None:
        return float(assume_mpp), "assumed"
    return None, "unknown"
