"""The tissue filter: Otsu on HSV saturation with floor and cap, white/black exclusion; agrees with the shipped sets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pue.data import patch_set
from pue.slides.tissue import (
    TissueFilter,
    is_tissue,
    otsu_threshold,
    saturation,
    tissue_fraction,
    tissue_mask,
)


def _fractions(set_name: str) -> np.ndarray:
    return np.array([tissue_fraction(Image.open(path)) for path in patch_set(set_name)])


@pytest.mark.parametrize("set_name", ["calibration", "heldout"])
def test_every_shipped_tissue_patch_is_tissue(set_name: str) -> None:
    paths = patch_set(set_name)
    assert paths
    rejected = [path.name for path in paths if not is_tissue(Image.open(path))]
    assert rejected == []
    # measured: calibration 0.544..0.997, heldout 0.550..0.980 (margin above the 0.5 limit)
    assert _fractions(set_name).min() > 0.52


def test_no_shipped_background_patch_is_tissue() -> None:
    paths = patch_set("background")
    assert paths
    assert [path.name for path in paths if is_tissue(Image.open(path))] == []
    assert _fractions("background").max() < 0.1  # measured 0.037 at most


def test_saturation_values() -> None:
    rgb = np.array([[[255, 255, 255], [0, 0, 0], [200, 100, 50], [255, 0, 0]]], dtype=np.uint8)
    np.testing.assert_allclose(saturation(rgb), [[0.0, 0.0, 0.75, 1.0]], atol=1e-6)


def test_otsu_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 5000)]).clip(0, 1)
    threshold = otsu_threshold(values)
    assert 0.15 < threshold < 0.45  # anywhere in the gap separates the modes equally well
    assert (values[:5000] < threshold).mean() > 0.999 and (values[5000:] > threshold).all()
    assert otsu_threshold(np.array([])) == 0.0


def test_threshold_is_clipped_to_floor_and_cap() -> None:
    params = TissueFilter()
    glass = np.full((64, 64, 3), 235, dtype=np.uint8)
    glass[::2, ::2] = (236, 232, 234)  # a faint speckle: Otsu alone would split it
    assert params.threshold(glass) == params.saturation_floor
    stain = np.zeros((64, 64, 3), dtype=np.uint8)
    stain[:, :32] = (200, 60, 160)  # two stains, no glass: Otsu alone lands between them
    stain[:, 32:] = (200, 150, 180)
    assert params.threshold(stain) == params.saturation_cap


def test_mask_excludes_white_and_black() -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (230, 200, 225)  # pale pink, saturation 0.13: tissue
    rgb[0, 1] = (250, 225, 245)  # near-white but saturated: not tissue
    rgb[0, 2] = (30, 0, 20)  # near-black but saturated: not tissue
    rgb[1, 0] = (120, 40, 160)  # hematoxylin-like: tissue
    rgb[1, 1] = (240, 240, 240)  # glass
    rgb[1, 2] = (200, 198, 199)  # grey dust, unsaturated
    mask = tissue_mask(rgb, threshold=0.06)
    assert mask.dtype == bool and mask.shape == (2, 3)
    assert mask.tolist() == [[True, False, False], [True, False, False]]


def test_fraction_and_is_tissue_on_synthetic_images() -> None:
    white = Image.new("RGB", (100, 100), (245, 245, 245))
    assert tissue_fraction(white) == 0.0
    assert not is_tissue(white)
    half = np.full((100, 100, 3), 245, dtype=np.uint8)
    half[:, :60] = (180, 90, 170)
    assert tissue_fraction(half) == pytest.approx(0.6)
    assert is_tissue(half)
    assert not is_tissue(half, min_fraction=0.7)
    black = np.zeros((10, 10, 3), dtype=np.uint8)
    assert tissue_fraction(black) == 0.0


def test_white_fraction_limit() -> None:
    params = TissueFilter(min_tissue_fraction=0.2, max_white_fraction=0.5)
    rgb = np.full((100, 100, 3), 250, dtype=np.uint8)
    rgb[:, :30] = (180, 90, 170)  # 30 % tissue, 70 % white
    assert params.measure(rgb) == pytest.approx((0.3, 0.7))
    assert not params.accepts(rgb)
    assert TissueFilter(min_tissue_fraction=0.2, max_white_fraction=0.8).accepts(rgb)


def test_filter_parameters_are_checked_and_recorded() -> None:
    with pytest.raises(ValueError):
        TissueFilter(saturation_floor=0.1, saturation_cap=0.05)
    with pytest.raises(ValueError):
        TissueFilter(min_tissue_fraction=1.5)
    record = TissueFilter().to_dict()
    assert record["method"] == "otsu-saturation"
    assert record["saturation_floor"] == 0.04 and record["saturation_cap"] == 0.06
    assert record["white_level"] == 220 and record["min_tissue_fraction"] == 0.5
    with pytest.raises(ValueError, match="uint8"):
        tissue_fraction(np.zeros((4, 4), dtype=np.uint8))
