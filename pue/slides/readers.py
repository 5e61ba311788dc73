"""Whole-slide readers: openslide (the `slides` extra) when installed, else Pillow.

`open_slide` picks the reader. Each reader knows the slide's size, its µm/px and magnification (from the
openslide properties or the TIFF description and resolution tags), the pyramid level for a downsample, and
reads thumbnails and square regions as RGB images. Pillow reads single-level files such as small Aperio SVS
regions and plain TIFFs. A region is read from the pyramid level closest above the wanted resolution (openslide's
best level for the downsample) and resized to the wanted size with Lanczos, so no one has to know a slide's levels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from pue.errors import MissingDependencyError, PueError

_SLIDES_HINT = 'install the slides extra (pip install "pue[slides]") to read pyramidal whole-slide images'


class SlideReader(Protocol):
    """What the tiler and the slide job need of a reader (both readers below are one)."""

    path: Path
    backend: str
    width: int
    height: int
    mpp: float | None  # µm per level-0 pixel, when the file records it
    magnification: float | None  # the scan's objective power, when the file records it

    def level_for(self, downsample: float) -> int: ...

    def thumbnail(self, max_side: int) -> tuple[Image.Image, float]: ...

    def read(self, x: int, y: int, extent: int, size: int) -> Image.Image: ...

    def close(self) -> None: ...


def open_slide(path: Path, reader: str = "auto") -> SlideReader:
    """openslide when installed and it can read the file; Pillow otherwise (single-level files)."""
    if reader not in ("auto", "openslide", "pillow"):
        raise PueError(f"unknown slide reader {reader!r}; known readers: auto, openslide, pillow")
    if not path.is_file():
        raise PueError(f"slide not found: {path}")
    openslide_error = None
    openslide = None
    if reader != "pillow":
        try:
            import openslide
        except (ImportError, OSError) as exc:  # OSError: openslide-python without the openslide library
            if reader == "openslide":
                raise MissingDependencyError("openslide-python", "slides", "reading slides with openslide") from exc
    if openslide is not None:
        try:
            return OpenSlideReader(path, openslide.OpenSlide(str(path)))
        except Exception as exc:  # unsupported or corrupt for openslide: Pillow may still read a plain TIFF
            if reader == "openslide":
                raise PueError(f"slide {path} cannot be read by openslide ({type(exc).__name__}: {exc})") from exc
            openslide_error = f"openslide: {exc}"
    try:
        return PillowSlideReader(path)
    except PueError as exc:
        if openslide_error is not None:
            raise PueError(
                f"slide {path} cannot be read: it is corrupt or in a format neither openslide nor Pillow reads "
                f"({openslide_error}; Pillow: {exc.message})"
            ) from exc
        raise


class PillowSlideReader:
    """Level 0 of a single-level slide (or the first page of a TIFF), decoded once into memory."""

    backend = "pillow"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._image: Image.Image | None = None
        try:
            with Image.open(path) as opened:
                self.width, self.height = opened.size
                tags = getattr(opened, "tag_v2", {})
                description = str(tags.get(270, "")) if tags else ""
                self.mpp = _mpp_from_tiff(description, tags)
                self.magnification = _number(r"AppMag\s*=\s*([0-9.]+)", description)
        except Image.UnidentifiedImageError as exc:
            raise PueError(f"slide {path} is corrupt or not an image Pillow can read", hint=_SLIDES_HINT) from exc
        except Exception as exc:
            raise PueError(f"slide {path} cannot be read ({type(exc).__name__}: {exc})") from exc
        if self.width * self.height > (Image.MAX_IMAGE_PIXELS or math.inf):
            raise PueError(
                f"slide {path} is {self.width} x {self.height} px, too large to decode whole with Pillow",
                hint=_SLIDES_HINT,
            )

    def image(self) -> Image.Image:
        if self._image is None:
            try:
                with Image.open(self.path) as opened:
                    opened.load()
                    self._image = opened.convert("RGB") if opened.mode != "RGB" else opened.copy()
            except Exception as exc:
                raise PueError(
                    f"slide {self.path} could not be decoded ({type(exc).__name__}: {exc}); it is truncated or corrupt"
                ) from exc
        return self._image

    def level_for(self, downsample: float) -> int:
        return 0

    def close(self) -> None:
        self._image = None

    def thumbnail(self, max_side: int) -> tuple[Image.Image, float]:
        factor = max(1, math.ceil(max(self.width, self.height) / max_side))
        image = self.image()
        thumb = image.reduce(factor) if factor > 1 else image
        return thumb, thumb.width / self.width

    def read(self, x: int, y: int, extent: int, size: int) -> Image.Image:
        tile = self.image().crop((x, y, x + extent, y + extent))
        return tile if extent == size else tile.resize((size, size), Image.Resampling.LANCZOS)


class OpenSlideReader:
    """A slide read through openslide: levels, regions and metadata."""

    backend = "openslide"

    def __init__(self, path: Path, slide: Any) -> None:
        self.path = path
        self.slide = slide
        self.width, self.height = slide.dimensions
        props = slide.properties
        self.mpp = _positive(props.get("openslide.mpp-x")) or _positive(props.get("aperio.MPP"))
        self.magnification = _positive(props.get("openslide.objective-power")) or _positive(props.get("aperio.AppMag"))

    def level_for(self, downsample: float) -> int:
        return int(self.slide.get_best_level_for_downsample(downsample * 1.01))

    def close(self) -> None:
        self.slide.close()

    def thumbnail(self, max_side: int) -> tuple[Image.Image, float]:
        thumb = self._guard(lambda: self.slide.get_thumbnail((max_side, max_side)).convert("RGB"))
        return thumb, thumb.width / self.width

    def read(self, x: int, y: int, extent: int, size: int) -> Image.Image:
        level = self.level_for(extent / size)
        side = max(1, round(extent / self.slide.level_downsamples[level]))
        region = self._guard(lambda: self.slide.read_region((x, y), level, (side, side)))
        # Transparent pixels lie outside the scanned area: white, like glass.
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))
        tile = Image.alpha_composite(white, region.convert("RGBA")).convert("RGB")
        return tile if side == size else tile.resize((size, size), Image.Resampling.LANCZOS)

    def _guard(self, read: Callable[[], Image.Image]) -> Image.Image:
        try:
            return read()
        except Exception as exc:
            raise PueError(
                f"slide {self.path} could not be read ({type(exc).__name__}: {exc}); it may be corrupt"
            ) from exc


def _mpp_from_tiff(description: str, tags: Any) -> float | None:
    aperio = _number(r"\bMPP\s*=\s*([0-9.]+)", description)
    if aperio:
        return aperio
    try:
        unit, resolution = tags.get(296), tags.get(282)
        if resolution and unit in (2, 3):  # pixels per inch / per centimetre
            mpp = (25400.0 if unit == 2 else 10000.0) / float(resolution)
            return mpp if 0.05 <= mpp <= 20 else None  # 72 dpi and the like are screen defaults, not a scan
    except (TypeError, ValueError, ZeroDivisionError):
        pass
    return None


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return _positive(match.group(1)) if match else None


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 and math.isfinite(number) else None
