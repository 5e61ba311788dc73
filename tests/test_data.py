"""The packaged sample patches: present, well-formed, the intended sizes, and spatially disjoint sets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pue.data import data_dir, default_recipe_path, patch_index, patch_set, patches_dir
from pue.errors import PueError

SETS = ("calibration", "heldout", "background")
SAT_LEVEL = 15  # a pixel with HSV saturation above this (0-255) counts as stained


def _rect(entry: dict) -> tuple[int, int, int, int]:
    return entry["x"], entry["y"], entry["x"] + entry["size"], entry["y"] + entry["size"]


def _intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _stained_fraction(path: Path) -> float:
    """Pixel-level stand-in for the generator's block-based tissue fraction (deliberately independent of it)."""
    with Image.open(path) as im:
        sat = np.asarray(im.convert("HSV"))[..., 1]
    return float((sat > SAT_LEVEL).mean())


@pytest.fixture(scope="module")
def index() -> list[dict]:
    return patch_index()


def test_paths() -> None:
    assert patches_dir() == data_dir() / "patches"
    assert default_recipe_path() == data_dir() / "recipe_e5v.json"
    assert default_recipe_path().is_file()


def test_every_indexed_file_is_a_224_rgb_jpeg(index: list[dict]) -> None:
    for entry in index:
        path = patches_dir() / entry["file"]
        assert path.is_file(), entry["file"]
        assert entry["file"].startswith(f"{entry['set']}/")
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (224, 224)), entry["file"]
        assert entry["size"] == 224 and entry["level"] == 0


def test_index_and_folders_agree(index: list[dict]) -> None:
    on_disk = sorted(p.relative_to(patches_dir()).as_posix() for p in patches_dir().glob("*/*.jpg"))
    assert on_disk == sorted(e["file"] for e in index)
    meta = json.loads((patches_dir() / "index.json").read_text())
    assert meta["counts"] == {name: len(patch_set(name)) for name in SETS}
    assert (patches_dir() / "PROVENANCE.md").is_file()


def test_set_sizes(index: list[dict]) -> None:
    assert len(patch_set("calibration")) >= 150
    assert len(patch_set("heldout")) >= 24
    assert sum(e["set"] == "heldout" and e["stain"] == "IHC" for e in index) >= 2
    assert sum(e["set"] == "calibration" and e["stain"] == "IHC" for e in index) >= 1
    assert len(patch_set("background")) >= 3
    assert all(p.is_file() for p in patch_set("heldout"))


def test_heldout_and_background_never_touch_calibration(index: list[dict]) -> None:
    for source in {e["source"] for e in index}:
        calibration = [_rect(e) for e in index if e["source"] == source and e["set"] == "calibration"]
        others = [e for e in index if e["source"] == source and e["set"] != "calibration"]
        for entry in others:
            assert not any(_intersect(_rect(entry), c) for c in calibration), entry["file"]
        # Held-out and background tiles are distinct samples too: no two share a pixel.
        for a, b in itertools.combinations(others, 2):
            assert not _intersect(_rect(a), _rect(b)), (a["file"], b["file"])


def test_tissue_and_background_look_like_it(index: list[dict]) -> None:
    for entry in index:
        stained = _stained_fraction(patches_dir() / entry["file"])
        if entry["kind"] == "tissue":
            assert entry["set"] != "background"
            assert entry["tissue_fraction"] >= 0.5 and stained >= 0.45, (entry["file"], stained)
        else:
            assert entry["set"] == "background"
            assert entry["tissue_fraction"] <= 0.05 and stained <= 0.1, (entry["file"], stained)
        # The indexed fraction must describe the shipped pixels, not some other crop.
        assert abs(stained - entry["tissue_fraction"]) <= 0.15, (entry["file"], stained, entry["tissue_fraction"])


def test_unknown_set_names_the_known_ones() -> None:
    with pytest.raises(PueError, match="background.*calibration.*heldout"):
        patch_set("nope")
