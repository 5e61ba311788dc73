"""Where calibration patches come from: folders of images, whole-slide images, or the patches pue ships.

Every source lists its usable patches (`PatchSource.candidates`) in a deterministic order, each a `Patch`
that records where it was cut (for calibration.json) and loads itself as an RGB PIL image on demand, so
calibration holds one patch at a time. `pue.calibration.sampling` draws a seeded, stratified selection
across sources.

Slides (`pue.calibration.slide_source.SlideSource`) are tiled and read by `pue.slides`, the package the slide
job uses too.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pue.errors import InputError, PueError
from pue.runtime.images import load_image
from pue.slides import readers
from pue.slides.tissue import TissueFilter

__all__ = [
    "IMAGE_SUFFIXES",
    "SLIDE_SUFFIXES",
    "FolderSource",
    "Patch",
    "PatchSource",
    "ShippedSource",
    "list_images",
    "open_sources",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn")
Progress = Callable[[int, int], None]  # (done, total)

# The seven non-identity symmetries of a square: a tissue patch turned or mirrored is another patch of the same
# tissue (no orientation in a section), and pixels the fit never saw in that order.
TRANSFORMS: dict[str, Image.Transpose] = {
    "rotate_90": Image.Transpose.ROTATE_90,
    "rotate_180": Image.Transpose.ROTATE_180,
    "rotate_270": Image.Transpose.ROTATE_270,
    "flip_left_right": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip_top_bottom": Image.Transpose.FLIP_TOP_BOTTOM,
    "transpose": Image.Transpose.TRANSPOSE,
    "transverse": Image.Transpose.TRANSVERSE,
}


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
    transform: str | None = None  # a dihedral transform applied after loading (`TRANSFORMS`), for check items
    slide: Any = field(default=None, compare=False, repr=False)  # the open slide reader, shared by a source

    def load(self) -> Image.Image:
        """The patch as an RGB image: size x size for slides, as stored for image files; `transform` applied."""
        image = self._read()
        return image if self.transform is None else image.transpose(TRANSFORMS[self.transform])

    def _read(self) -> Image.Image:
        if self.file is not None:
            from pue.data import patches_dir

            return _load_file(patches_dir() / self.file)
        if self.x is None or self.y is None:
            return _load_file(Path(self.source))
        reader = self.slide if self.slide is not None else readers.open_slide(Path(self.source))
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
            **({"transform": self.transform} if self.transform is not None else {}),
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
            from pue.calibration.slide_source import SlideSource

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
