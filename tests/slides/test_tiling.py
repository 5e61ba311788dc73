"""pue.slides: geometry at a magnification or µm/px, the grid (overlap, no cap), the tissue rule, pyramid reads,
TRIDENT/CLAM coordinate files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slide_files import require, tissue_slide_rgb, write_pyramid

from pue.errors import PueError
from pue.slides.readers import open_slide
from pue.slides.resolution import Resolution, nominal_magnification, tile_geometry
from pue.slides.tiling import grid_coords, tile_fractions, tissue_tiles


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openslide")
    rgb = tissue_slide_rgb(2048, 1536, box=(0.25, 0.3, 0.7, 0.75))
    return write_pyramid(tmp_path_factory.mktemp("slides") / "pyramid.tif", rgb, mpp=0.25)


def test_grid_covers_the_slide_with_overlap() -> None:
    coords = grid_coords(1000, 500, 200, 200)
    assert coords.shape == (10, 2) and coords.dtype == np.int64
    assert coords[:6].tolist() == [[0, 0], [200, 0], [400, 0], [600, 0], [800, 0], [0, 200]]
    overlapped = grid_coords(1000, 500, 200, 150)  # 50 px overlap
    assert overlapped[:, 0].max() == 750 and len(overlapped) == 6 * 3
    assert grid_coords(100, 100, 200, 200).shape == (0, 2)


def test_no_cap_on_the_number_of_tiles() -> None:
    assert grid_coords(100_000, 80_000, 448, 448).shape[0] == (100_000 // 448) * (80_000 // 448)


def test_tile_fractions_on_a_mask() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    coords = np.array([[0, 0], [50, 0], [20, 20]], np.int64)
    fractions = tile_fractions(mask, coords, 50, 0.1)  # tiles of 5 x 5 mask pixels
    assert fractions.tolist() == [1.0, 0.0, 0.36]


def test_nominal_magnification() -> None:
    assert nominal_magnification(0.2527) == 40.0 and nominal_magnification(0.499) == 20.0
    assert nominal_magnification(0.33) == pytest.approx(30.3, abs=0.01)


def test_geometry_at_magnification_and_mpp(pyramid: Path) -> None:
    reader = open_slide(pyramid)
    assert reader.backend == "openslide" and reader.mpp == pytest.approx(0.25)
    at20 = tile_geometry(reader, 224, Resolution(magnification=20))
    assert (at20.patch_size_level0, at20.stride_level0, at20.level, at20.patch_mpp) == (448, 448, 1, 0.5)
    assert at20.level0_magnification == 40.0 and at20.mpp_source == "file"
    overlapped = tile_geometry(reader, 224, Resolution(magnification=10), overlap=32)
    assert (overlapped.patch_size_level0, overlapped.stride_level0, overlapped.level) == (896, 768, 2)
    by_mpp = tile_geometry(reader, 224, Resolution(mpp=0.75))  # downsample 3: read level 1 (2x), resized
    assert by_mpp.patch_size_level0 == 672 and by_mpp.level == 1
    with pytest.raises(PueError, match="upsampling"):
        tile_geometry(reader, 224, Resolution(magnification=80))
    with pytest.raises(PueError, match="overlap"):
        tile_geometry(reader, 224, Resolution(magnification=20), overlap=224)
    with pytest.raises(PueError, match="not both"):
        Resolution(magnification=20, mpp=0.5)


def test_no_resolution_metadata_needs_assume_mpp(tmp_path: Path) -> None:
    require("openslide")
    path = write_pyramid(tmp_path / "nores.tif", tissue_slide_rgb(1024, 1024), mpp=None, levels=2)
    reader = open_slide(path)
    assert reader.mpp is None and reader.magnification is None
    with pytest.raises(PueError, match="--assume-mpp"):
        tile_geometry(reader, 224, Resolution(magnification=20))
    assumed = tile_geometry(reader, 224, Resolution(magnification=20), assume_mpp=0.25)
    assert assumed.patch_size_level0 == 448 and assumed.mpp_source == "assumed"
    csv = tile_geometry(reader, 224, Resolution(magnification=20), mpp_override=0.5, assume_mpp=0.25)
    assert csv.patch_size_level0 == 224 and csv.mpp_source == "csv"


def test_tissue_rule_keeps_tiles_overlapping_tissue(pyramid: Path) -> None:
    reader = open_slide(pyramid)
    geometry = tile_geometry(reader, 224, Resolution(magnification=20))
    tiles = tissue_tiles(reader, geometry)
    assert tiles.grid_tiles == 4 * 3
    # tissue spans x 512..1434, y 461..1152: tiles overlapping it, including partial ones
    kept = {tuple(xy) for xy in tiles.coords.tolist()}
    assert kept == {(x, y) for x in (448, 896, 1344) for y in (448, 896)}
    # tissue fractions by hand: (896, 448) 0.97, (448, 448) 0.86 x 0.97 = 0.83, (896, 896) 0.57, the rest less
    strict = tissue_tiles(reader, geometry, min_tissue=0.9)
    assert {tuple(xy) for xy in strict.coords.tolist()} == {(896, 448)}
    most = tissue_tiles(reader, geometry, min_tissue=0.7)
    assert {tuple(xy) for xy in most.coords.tolist()} == {(448, 448), (896, 448)}
    # the tile read at level 1 is the level-0 square reduced 2x
    tile = np.asarray(reader.read(896, 448, 448, 224))
    level1 = np.asarray(reader.slide.read_region((896, 448), 1, (224, 224)).convert("RGB"))
    assert tile.shape == (224, 224, 3) and np.array_equal(tile, level1)


def test_all_background_slide_has_no_tiles(tmp_path: Path) -> None:
    require("openslide")
    path = write_pyramid(tmp_path / "glass.tif", tissue_slide_rgb(1024, 1024, seed=3), mpp=0.5, levels=2)
    reader = open_slide(path)
    tiles = tissue_tiles(reader, tile_geometry(reader, 224, Resolution(magnification=20)))
    assert tiles.grid_tiles == 16 and len(tiles) == 0 and tiles.coords.shape == (0, 2)


def test_trident_and_clam_coordinate_files(tmp_path: Path) -> None:
    h5py = require("h5py")
    from pue.slides.coords_files import find_coords_file, read_patch_coords

    (tmp_path / "patches").mkdir()
    coords = np.array([[0, 0], [448, 0]], np.int64)
    with h5py.File(tmp_path / "patches" / "s1_patches.h5", "w") as handle:
        dataset = handle.create_dataset("coords", data=coords)
        dataset.attrs.update({"patch_size": 224, "patch_size_level0": 448, "target_magnification": 20, "overlap": 0})
    with h5py.File(tmp_path / "patches" / "s2.h5", "w") as handle:
        dataset = handle.create_dataset("coords", data=coords)
        dataset.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])})
    trident = read_patch_coords(find_coords_file(tmp_path, "s1"))
    assert trident.layout == "trident" and trident.patch_size_level0 == 448
    assert trident.coords.tolist() == [[0, 0], [448, 0]]
    clam = read_patch_coords(find_coords_file(tmp_path, "s2"))
    assert clam.layout == "clam" and clam.patch_size_level0 == 1024
    with pytest.raises(PueError, match="no patch coordinates for slide s3"):
        find_coords_file(tmp_path, "s3")
