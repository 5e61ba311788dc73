"""Slides written by the tests: pyramidal TIFFs (tifffile: tiled levels as successive IFDs, as openslide's generic
TIFF reader takes them), with and without resolution tags; copies truncated or with corrupted tile data.

`PUE_REQUIRE_SLIDES=1` (set by .ci/run) turns a missing slide dependency into a failure instead of a skip, and
`PUE_REQUIRE_RAY=1` a missing Ray (the Ray engine's tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SHARED_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmu_small_region.svs"


def require(module: str, flag: str = "PUE_REQUIRE_SLIDES", extras: str = "slides,dev") -> Any:
    """`pytest.importorskip`, except that under CI (`flag`=1, e.g. PUE_REQUIRE_SLIDES, PUE_REQUIRE_RAY) a missing
    module fails the test."""
    if os.environ.get(flag) == "1":
        try:
            return __import__(module)
        except (ImportError, OSError) as exc:
            pytest.fail(f"{module} is required under CI ({flag}=1): {exc}; pip install -e '.[{extras}]'")
    try:
        return __import__(module)
    except (ImportError, OSError):
        pytest.skip(f"{module} is not installed (pip install -e '.[{extras}]')")


def tissue_slide_rgb(width: int, height: int, seed: int = 0, box: tuple[float, float, float, float] | None = None):
    """Glass (near white, slight noise) with an H&E-coloured block of tissue in `box` (fractions x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    rgb = np.clip(rng.normal(240, 2, (height, width, 3)), 0, 255).astype(np.uint8)
    if box is not None:
        x0, y0, x1, y1 = (int(round(f * s)) for f, s in zip(box, (width, height, width, height), strict=True))
        h, w = y1 - y0, x1 - x0
        rgb[y0:y1, x0:x1, 0] = rng.integers(150, 220, (h, w))
        rgb[y0:y1, x0:x1, 1] = rng.integers(60, 120, (h, w))
        rgb[y0:y1, x0:x1, 2] = rng.integers(140, 200, (h, w))
    return rgb


def write_pyramid(
    path: Path,
    rgb: np.ndarray,
    mpp: float | None = 0.25,
    levels: int = 3,
    tile: int = 256,
    description: str | None = None,
) -> Path:
    """A tiled pyramidal TIFF: level k is level 0 reduced by 2**k; resolution tags when `mpp` is given."""
    tifffile = require("tifffile")
    from PIL import Image

    image = Image.fromarray(rgb)
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            data = np.asarray(image.reduce(2**level)) if level else rgb
            options: dict[str, Any] = {}
            if mpp is not None:
                per_cm = 10000.0 / (mpp * 2**level)
                options = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                data,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                metadata=None,
                **options,
            )
    return path


def truncated_copy(source: Path, target: Path, fraction: float = 0.6) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def corrupted_copy(source: Path, target: Path, start_fraction: float = 0.3, length: int = 20000) -> Path:
    """The file with a run of its tile data overwritten by garbage (its headers intact)."""
    data = bytearray(source.read_bytes())
    start = int(len(data) * start_fraction)
    data[start : start + length] = np.random.default_rng(1).integers(0, 256, length, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    return target
