"""Tissue filter: tells stained tissue from glass, so calibration never sees empty slide background.

A pixel is tissue when its HSV saturation exceeds a threshold and it is neither near-white (glass, lumen:
all channels >= `white_level`) nor near-black (pen, dust, out-of-scan areas: all channels <= `black_level`).
The threshold is Otsu's over the image's saturation (a numpy histogram implementation), clipped to
[`saturation_floor`, `saturation_cap`]:

* the floor keeps Otsu from splitting glass noise when an image is all glass (glass measures about 0.01);
* the cap keeps it from splitting two stains when an image is mostly tissue: on an H&E slide Otsu lands
  near 0.2, between dense and pale eosin, and would call pale stroma glass (the shipped patches were cut
  with the same cap, 15 on a 0-255 scale).

A slide's threshold is computed once on its thumbnail and passed to every tile's check (`threshold=`); a
lone image computes its own. An image is tissue when its tissue fraction reaches `min_tissue_fraction` and
its white fraction stays at or below `max_white_fraction`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["TissueFilter", "is_tissue", "otsu_threshold", "saturation", "tissue_fraction", "tissue_mask"]


@dataclass(frozen=True)
class TissueFilter:
    """The filter's parameters (saturation on a 0-1 scale, levels on 0-255); recorded in calibration.json."""

    saturation_floor: float = 0.04
    saturation_cap: float = 0.06
    white_level: int = 220
    black_level: int = 30
    min_tissue_fraction: float = 0.5
    max_white_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.saturation_floor <= self.saturation_cap <= 1.0:
            raise ValueError(
                f"need 0 <= saturation_floor <= saturation_cap <= 1, got {self.saturation_floor}, {self.saturation_cap}"
            )
        if not 0.0 <= self.min_tissue_fraction <= 1.0 or not 0.0 <= self.max_white_fraction <= 1.0:
            raise ValueError("min_tissue_fraction and max_white_fraction are fractions in [0, 1]")

    def threshold(self, rgb: np.ndarray) -> float:
        """The saturation threshold for this image: Otsu's, clipped to [floor, cap]."""
        # Glass pixels stay in: they are the class Otsu should split off.
        return float(np.clip(otsu_threshold(saturation(rgb)), self.saturation_floor, self.saturation_cap))

    def mask(self, rgb: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Boolean H x W mask of tissue pixels."""
        if threshold is None:
            threshold = self.threshold(rgb)
        return (saturation(rgb) > threshold) & _usable(rgb, self)

    def measure(self, image: Any, threshold: float | None = None) -> tuple[float, float]:
        """(tissue fraction, white fraction) of an image."""
        rgb = as_rgb_array(image)
        white = float(_white(rgb, self.white_level).mean())
        return float(self.mask(rgb, threshold).mean()), white

    def accepts(self, image: Any, threshold: float | None = None) -> bool:
        """Whether the image is tissue by this filter."""
        tissue, white = self.measure(image, threshold)
        return tissue >= self.min_tissue_fraction and white <= self.max_white_fraction

    def describe(self) -> str:
        """One line for error messages."""
        return (
            f"saturation > Otsu clipped to [{self.saturation_floor:g}, {self.saturation_cap:g}], "
            f"not white (all channels >= {self.white_level}) nor black (all <= {self.black_level}); "
            f"tissue fraction >= {self.min_tissue_fraction:g}, white fraction <= {self.max_white_fraction:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"method": "otsu-saturation", **asdict(self)}


def as_rgb_array(image: Any) -> np.ndarray:
    """An H x W x 3 uint8 array from a PIL image (converted to RGB) or such an array (as is)."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 array, found shape {array.shape} dtype {array.dtype}")
    return array


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an (..., 3) RGB array: (max - min) / max, 0 for black."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(red, green), blue)
    low = np.minimum(np.minimum(red, green), blue)
    # low is 0 wherever high is, so dividing by max(high, 1) gives 0 for black
    return (high - low).astype(np.float32) / np.maximum(high, 1).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the bin edge that maximises the between-class variance."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    hist = np.histogram(values, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    p = hist / hist.sum()
    weight = np.cumsum(p)  # class 0 = bins 0..k
    mean = np.cumsum(p * np.arange(bins))
    between = (mean[-1] * weight - mean) ** 2 / np.maximum(weight * (1.0 - weight), 1e-12)
    return float((np.argmax(between) + 1) / bins)  # upper edge of the last class-0 bin


def _usable(rgb: np.ndarray, params: TissueFilter) -> np.ndarray:
    return ~(_white(rgb, params.white_level) | _black(rgb, params.black_level))


def _white(rgb: np.ndarray, level: int) -> np.ndarray:
    """All three channels >= level (the darkest channel is)."""
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) >= level


def _black(rgb: np.ndarray, level: int) -> np.ndarray:
    """All three channels <= level (the brightest channel is)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) <= level


_DEFAULT = TissueFilter()


def tissue_mask(rgb: np.ndarray, threshold: float | None = None, params: TissueFilter = _DEFAULT) -> np.ndarray:
    """Boolean H x W mask of the tissue pixels of an H x W x 3 uint8 RGB array (see the module docstring)."""
    return params.mask(as_rgb_array(rgb), threshold)


def tissue_fraction(image: Any, threshold: float | None = None, params: TissueFilter = _DEFAULT) -> float:
    """Fraction of an image's pixels (PIL image or H x W x 3 uint8 array) that are tissue."""
    return params.measure(image, threshold)[0]


def is_tissue(
    image: Any, min_fraction: float | None = None, threshold: float | None = None, params: TissueFilter = _DEFAULT
) -> bool:
    """Whether an image is tissue: tissue fraction >= `min_fraction` (default the filter's 0.5), white <= 0.5."""
    tissue, white = params.measure(image, threshold)
    minimum = params.min_tissue_fraction if min_fraction is None else min_fraction
    return tissue >= minimum and white <= params.max_white_fraction
