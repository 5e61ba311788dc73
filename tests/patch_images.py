"""Calibration patches written by the tests: H&E-coloured noise images the tissue filter accepts, and folders of
them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def tissue_image(seed: int, size: int = 64) -> Image.Image:
    """An H&E-coloured noise image that the tissue filter accepts."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((size, size, 3), dtype=np.uint8)
    rgb[..., 0] = rng.integers(150, 220, (size, size))
    rgb[..., 1] = rng.integers(60, 120, (size, size))
    rgb[..., 2] = rng.integers(140, 200, (size, size))
    return Image.fromarray(rgb)


def image_folder(root: Path, count: int, prefix: str = "img") -> Path:
    """`count` tissue images named `{prefix}_NN.png` in `root` (created)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        tissue_image(i).save(root / f"{prefix}_{i:02d}.png")
    return root
