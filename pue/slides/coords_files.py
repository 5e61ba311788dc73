"""Patch coordinates from TRIDENT or CLAM, so pue embeds exactly the tiles another pipeline chose.

TRIDENT writes `<dir>/patches/<slide_id>_patches.h5` with a dataset `coords` (level-0 top-left x, y) whose
attributes include `patch_size`, `patch_size_level0`, `target_magnification` and `overlap`. CLAM writes
`<dir>/patches/<slide_id>.h5` with `coords` carrying `patch_size` and `patch_level` (the size is in pixels of
that level) and `downsample` (that level's downsample), so a tile covers `patch_size × downsample` level-0 pixels.
`--coords-from DIR` accepts either layout, with or without the `patches/` folder. h5py (the `slides` extra) is
imported when a file is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pue.errors import MissingDependencyError, PueError

__all__ = ["PatchCoords", "find_coords_file", "read_patch_coords"]


@dataclass(frozen=True)
class PatchCoords:
    """Tiles another pipeline chose: level-0 top-left corners and the level-0 square each covers."""

    path: Path
    layout: str  # "trident" or "clam"
    coords: np.ndarray  # int64 (N, 2)
    patch_size_level0: int
    patch_size: int | None  # the file's own patch size, at its target magnification or level
    target_magnification: float | None
    overlap: int


def find_coords_file(folder: Path, slide_id: str) -> Path:
    """The TRIDENT (`<id>_patches.h5`) or CLAM (`<id>.h5`) coordinates file of `slide_id` in `folder`."""
    folder = Path(folder)
    candidates = [
        base / name
        for base in (folder / "patches", folder)
        for name in (f"{slide_id}_patches.h5", f"{slide_id}.h5")
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PueError(
        f"no patch coordinates for slide {slide_id} in {folder}",
        hint=f"expected TRIDENT's patches/{slide_id}_patches.h5 or CLAM's patches/{slide_id}.h5",
    )


def read_patch_coords(path: Path) -> PatchCoords:
    """Read a TRIDENT or CLAM coordinates file (the layout is told by its attributes)."""
    try:
        import h5py
    except ImportError as exc:
        raise MissingDependencyError("h5py", "slides", "reading patch coordinates") from exc
    try:
        with h5py.File(path, "r") as handle:
            if "coords" not in handle:
                raise PueError(f"{path} has no dataset 'coords'", hint="pass TRIDENT's or CLAM's patches folder")
            dataset = handle["coords"]
            coords = np.asarray(dataset[()], dtype=np.int64).reshape(-1, 2)
            attrs = {key: _plain(value) for key, value in dataset.attrs.items()}
    except PueError:
        raise
    except (OSError, ValueError) as exc:
        raise PueError(f"cannot read patch coordinates from {path} ({type(exc).__name__}: {exc})") from exc
    if "patch_size_level0" in attrs:
        return PatchCoords(
            path=Path(path),
            layout="trident",
            coords=coords,
            patch_size_level0=int(attrs["patch_size_level0"]),
            patch_size=_optional_int(attrs.get("patch_size")),
            target_magnification=_optional_float(attrs.get("target_magnification")),
            overlap=int(attrs.get("overlap") or 0),
        )
    if "patch_size" in attrs and "patch_level" in attrs:
        downsample = np.asarray(attrs.get("downsample", 1.0), dtype=np.float64).ravel()
        return PatchCoords(
            path=Path(path),
            layout="clam",
            coords=coords,
            patch_size_level0=round(int(attrs["patch_size"]) * float(downsample[0])),
            patch_size=int(attrs["patch_size"]),
            target_magnification=None,
            overlap=0,
        )
    raise PueError(
        f"{path}: 'coords' carries neither TRIDENT's attributes (patch_size_level0) nor CLAM's (patch_size, "
        f"patch_level); found {sorted(attrs)}",
        hint="pass the patches folder TRIDENT or CLAM wrote",
    )


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
