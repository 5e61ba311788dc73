"""Where calibration patches come from: folders of images, whole-slide images, or the patches pue ships.

Every source lists its usable patches (`PatchSource.candidates`) in a deterministic order, each a `Patch`
that records where it was cut (for calibration.json) and loads itself as an RGB PIL image on demand, so
calibration holds one patch at a time. `pue.calibration.sampling` draws a seeded, stratified selection
across sources.

Slides are tiled on a grid at a patch size and a magnification or µm/px, as pathology tools take them
(TRIDENT's convention: 10x is 1 µm/px), never at a pyramid level the user has to know. A slide's tiles are
kept by the tissue filter (`pue.calibration.tissue`): first on a thumbnail, then each tile at full size.
Slides are read with openslide (the `slides` extra) when it is installed, otherwise with Pillow, which reads
single-level files such as small Aperio SVS regions and plain TIFFs; the readers are in `pue.calibration.slides`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pue.calibration import slides
from pue.calibration.tissue import TissueFilter
from pue.errors import InputError, PueError
from pue.runtime.images import load_image

__all__ = [
    "IMAGE_SUFFIXES",
    "SLIDE_SUFFIXES",
    "FolderSource",
    "Patch",
    "PatchSource",
    "ShippedSource",
    "SlideSource",
    "list_images",
    "open_sources",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn")
Progress = Callable[[int, int], None]  # (done, total)

# A target within 10 % of the native resolution reads the native pixels: 20x of a 0.499 µm/px scan is 20x.
_RESOLUTION_TOLERANCE = 0.1
_THUMBNAIL_SIDE = 2048


@dataclass(frozen=True)
class Patch:
    """One calibration patch and where it was cut (level-0 pixel coordinates for slides)."""

    source: str  # file path of the image or slide, or "shipped:<set>"
    x: int | None = None
    y: int | None = None
    size: int | None = None  # side of the patch as loaded, in pixels (None: an image file as is)
    level: int | None = None  # pyramid level read (0 for single-level files)
    mpp: float | None = None  # µm per pixel of the patch as loaded, when known
    extent: int | None = None  # side of the square covered, in level-0 pixels (size x downsample)
    file: str | None = None  # shipped patches: the file, relative to pue.data.patches_dir()
    origin: str | None = None  # shipped patches: the image they were cut from
    slide: Any = field(default=None, compare=False, repr=False)  # the open slide reader, shared by a source

    def load(self) -> Image.Image:
        """The patch as an RGB image: size x size for slides, as stored for image files."""
        if self.file is not None:
            from pue.data import patches_dir

            return _load_file(patches_dir() / self.file)
        if self.x is None or self.y is None:
            return _load_file(Path(self.source))
        reader = self.slide if self.slide is not None else slides.open_slide(Path(self.source))
        extent = self.extent or self.size
        return reader.read(self.x, self.y, extent, self.size or extent)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "x": self.x,
            "y": self.y,
            "size": self.size,
            "level": self.level,
            "mpp": self.mpp,
            "extent": self.extent,
            "file": self.file,
            "origin": self.origin,
        }


class PatchSource(abc.ABC):
    """A place to draw calibration patches from."""

    name: str
    kind: str = "source"

    def candidates(self, progress: Progress | None = None) -> list[Patch]:
        """All usable patches, in a deterministic order; computed once, then cached."""
        cached = getattr(self, "_candidates", None)
        if cached is None:
            cached = self._scan(progress)
            self._candidates = cached
        return list(cached)

    @abc.abstractmethod
    def _scan(self, progress: Progress | None) -> list[Patch]: ...

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        """(file, reason) for every file that could not be read; filled by `candidates()`."""
        return list(getattr(self, "_unreadable", []))

    def describe(self) -> dict[str, Any]:
        """What calibration.json records about this source (after `candidates()`)."""
        return {"name": self.name, "kind": self.kind}


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files (png, jpg, jpeg, tif, tiff; any case) in a folder, sorted; hidden files and folders are ignored."""
    folder = Path(folder)
    if not folder.exists():
        raise PueError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise PueError(f"not a folder: {folder}", hint="pass a folder of images, an image file or a slide")
    found = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(
        (
            path
            for path in found
            if path.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        ),
        key=lambda path: path.relative_to(folder).as_posix(),
    )
    images = [path for path in images if path.is_file()]
    if not images:
        where = "or its subfolders " if recursive else ""
        raise PueError(
            f"no image files ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in folder {folder} {where}".rstrip(),
            hint="pass a folder of patches, or a slide file",
        )
    return images


class FolderSource(PatchSource):
    """Every image file of a folder (or one image file), loaded as is.

    `candidates()` decodes each file; files that fail are not used and are recorded, with the reason, in
    `unreadable`. With a `tissue_filter`, images it rejects are left out too and listed in `background`.
    """

    kind = "folder"

    def __init__(self, path: Path, recursive: bool = False, tissue_filter: TissueFilter | None = None) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.recursive = recursive
        self.tissue_filter = tissue_filter
        if self.path.is_file():
            self.files = [self.path]
        else:
            self.files = list_images(self.path, recursive)
        self.background: list[str] = []

    def _scan(self, progress: Progress | None) -> list[Patch]:
        patches: list[Patch] = []
        unreadable: list[tuple[str, str]] = []
        background: list[str] = []
        for index, path in enumerate(self.files):
            try:
                image = _load_file(path)
            except PueError as exc:
                unreadable.append((str(path), exc.message))
            else:
                if self.tissue_filter is not None and not self.tissue_filter.accepts(image):
                    background.append(str(path))
                else:
                    patches.append(Patch(source=str(path)))
            if progress is not None:
                progress(index + 1, len(self.files))
        self._unreadable = unreadable
        self.background = background
        return patches

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "files": len(self.files), "unreadable": len(self.unreadable)}
        if self.tissue_filter is not None:
            info["tissue_filter"] = self.tissue_filter.to_dict()
            info["background"] = len(self.background)
        return info


class ShippedSource(PatchSource):
    """The sample patches shipped with pue (`pue.data.patch_set`), with coordinates from their index."""

    kind = "shipped"

    def __init__(self, set_name: str = "calibration") -> None:
        self.set_name = set_name
        self.name = f"shipped:{set_name}"

    def _scan(self, progress: Progress | None) -> list[Patch]:
        from pue.data import patch_index, patch_set, patches_dir

        paths = patch_set(self.set_name)  # refuses unknown set names
        entries = {entry["file"]: entry for entry in patch_index() if entry["set"] == self.set_name}
        root = patches_dir()
        patches = []
        for path in paths:
            entry = entries[path.relative_to(root).as_posix()]
            patches.append(
                Patch(
                    source=self.name,
                    x=entry.get("x"),
                    y=entry.get("y"),
                    size=entry.get("size"),
                    level=entry.get("level"),
                    mpp=entry.get("mpp"),
                    extent=entry.get("size"),
                    file=entry["file"],
                    origin=entry.get("source"),
                )
            )
        if progress is not None:
            progress(len(patches), len(patches))
        return patches


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
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
            raise PueError(f"patch size must be a positive integer, got {patch_size!r}")
        if magnification is not None and mpp is not None:
            raise PueError("give either a magnification or a µm/px target for slides, not both")
        for label, value in (("magnification", magnification), ("µm/px", mpp)):
            if value is not None and not value > 0:
                raise PueError(f"{label} must be positive, got {value!r}")
        self.path = Path(path)
        self.name = str(self.path)
        self.patch_size = patch_size
        self.magnification = magnification
        self.mpp = mpp
        self.tissue_filter = tissue_filter or TissueFilter()
        self.max_tiles = max_tiles
        self.reader = slides.open_slide(self.path, reader)
        self.downsample = self._downsample()
        self.extent = round(patch_size * self.downsample)
        native = self.reader.mpp
        self.patch_mpp = None if native is None else round(native * self.extent / patch_size, 6)
        self.stats: dict[str, Any] = {}

    def _downsample(self) -> float:
        native_mpp, native_mag = self.reader.mpp, self.reader.magnification
        if self.magnification is None and self.mpp is None:
            return 1.0
        # 10x is taken as 1 µm/px where only one of the two is known (TRIDENT's convention).
        if self.magnification is not None:
            target = f"{self.magnification:g}x"
            if native_mag is not None:
                downsample = native_mag / self.magnification
            elif native_mpp is not None:
                downsample = 10.0 / self.magnification / native_mpp
            else:
                downsample = None
        else:
            target = f"{self.mpp:g} µm/px"
            if native_mpp is not None:
                downsample = self.mpp / native_mpp
            elif native_mag is not None:
                downsample = self.mpp / (10.0 / native_mag)
            else:
                downsample = None
        if downsample is None:
            raise PueError(
                f"slide {self.path} records neither its magnification nor its µm/px, so {target} cannot be found",
                hint="leave out the magnification / µm/px to tile it at its native resolution",
            )
        if abs(downsample - 1.0) <= _RESOLUTION_TOLERANCE:
            return 1.0
        if downsample < 1.0:
            raise PueError(
                f"slide {self.path} is scanned at {self._native_text()}; {target} would need upsampling",
                hint="ask for a magnification at or below the scan's",
            )
        return downsample

    def _native_text(self) -> str:
        parts = []
        if self.reader.magnification is not None:
            parts.append(f"{self.reader.magnification:g}x")
        if self.reader.mpp is not None:
            parts.append(f"{self.reader.mpp:g} µm/px")
        return " / ".join(parts) or "an unknown resolution"

    def _scan(self, progress: Progress | None) -> list[Patch]:
        width, height, extent = self.reader.width, self.reader.height, self.extent
        grid = [(x, y) for y in range(0, height - extent + 1, extent) for x in range(0, width - extent + 1, extent)]
        if not grid:
            raise PueError(
                f"slide {self.path} is {width} x {height} px, smaller than one tile ({extent} px of level 0 for "
                f"{self.patch_size} px patches at {self._target_text()})"
            )
        thumbnail, scale = self.reader.thumbnail(_THUMBNAIL_SIDE)
        rgb = np.asarray(thumbnail)
        threshold = self.tissue_filter.threshold(rgb)
        mask = self.tissue_filter.mask(rgb, threshold)
        # A lenient first pass: the thumbnail only spares reading glass tiles; each tile is checked at full size.
        first_pass = [
            (x, y)
            for x, y in grid
            if _region_fraction(mask, x, y, extent, scale) >= self.tissue_filter.min_tissue_fraction / 2
        ]
        checked = _evenly(first_pass, self.max_tiles)
        level = self.reader.level_for(self.downsample)
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
                        level=level,
                        mpp=self.patch_mpp,
                        extent=extent,
                        slide=self.reader,
                    )
                )
            if progress is not None:
                progress(done, len(checked))
        self.stats = {
            "grid_tiles": len(grid),
            "thumbnail_tissue_tiles": len(first_pass),
            "checked_tiles": len(checked),
            "tissue_tiles": len(patches),
            "saturation_threshold": round(threshold, 4),
        }
        if not patches:
            raise PueError(
                f"no tissue found in slide {self.path}: none of its {len(grid)} tiles ({self.patch_size} px at "
                f"{self._target_text()}) passed the tissue filter (saturation threshold {threshold:.3f}; "
                f"{self.tissue_filter.describe()})",
                hint="pass a slide with tissue on it, or a folder of patches",
            )
        return patches

    def _target_text(self) -> str:
        if self.magnification is not None:
            return f"{self.magnification:g}x"
        if self.mpp is not None:
            return f"{self.mpp:g} µm/px"
        return "native resolution"

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
            "tissue_filter": self.tissue_filter.to_dict(),
            **self.stats,
        }


def open_sources(
    paths: list[Path] | None,
    patch_size: int = 224,
    magnification: float | None = None,
    mpp: float | None = None,
    tissue_filter: TissueFilter | None = None,
    recursive: bool = False,
) -> list[PatchSource]:
    """One source per path: a folder of images, an image file or a slide; none at all → the shipped patches.

    Files with a slide suffix (svs, tif, tiff, ndpi, mrxs, scn) are tiled as slides; png and jpg files are
    single images. `tissue_filter` applies to slides (default: `TissueFilter()`).
    """
    if not paths:
        return [ShippedSource()]
    sources: list[PatchSource] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise PueError(f"calibration source not found: {path}")
        suffix = path.suffix.lower()
        if path.is_dir():
            sources.append(FolderSource(path, recursive=recursive))
        elif suffix in SLIDE_SUFFIXES:
            sources.append(SlideSource(path, patch_size, magnification, mpp, tissue_filter))
        elif suffix in IMAGE_SUFFIXES:
            sources.append(FolderSource(path))
        else:
            raise PueError(
                f"calibration source {path} is neither a folder, an image ({', '.join(IMAGE_SUFFIXES)}) nor a "
                f"slide ({', '.join(SLIDE_SUFFIXES)})"
            )
    return sources


def _load_file(path: Path) -> Image.Image:
    """Decode an image file strictly (`load_image`), with errors naming the file only."""
    try:
        return load_image(path, 0)
    except InputError as exc:
        prefix = f"item 0 {path}: "
        message = exc.message[len(prefix) :] if exc.message.startswith(prefix) else exc.message
        raise PueError(message, hint=exc.hint) from exc


def _region_fraction(mask: np.ndarray, x: int, y: int, extent: int, scale: float) -> float:
    x0, y0 = int(x * scale), int(y * scale)
    x1 = max(x0 + 1, math.ceil((x + extent) * scale))
    y1 = max(y0 + 1, math.ceil((y + extent) * scale))
    region = mask[y0:y1, x0:x1]
    return float(region.mean()) if region.size else 0.0


def _evenly(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else items[:1]
