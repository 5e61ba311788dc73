"""pue.embed.search without a model: cosine scores and top-k on vectors computed by hand, finding a slide's features
made with a given bundle (and refusing another bundle's), finding the slide file through the run records, and the
heatmap / contact sheet drawn over a small image slide."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slide_files import require

from pue.embed.search import find_features, find_slide_file, score_tiles
from pue.embed.search_pictures import colour_ramp, contact_sheet, heatmap
from pue.embed.writers import read_slide_file, write_slide_file
from pue.errors import PueError
from pue.slides.readers import open_slide

HASH_A, HASH_B = "a" * 64, "b" * 64


def test_scores_are_cosines_and_top_k_is_best_first() -> None:
    features = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1], [0.6, 0.8, 0]], np.float32)
    query = np.array([0.8, 0.6, 0], np.float32)
    hits = score_tiles(features, query, top_k=3)
    np.testing.assert_allclose(hits.scores, [0.8, 0.6, 0.96, 0.0, 0.96], atol=1e-6)
    assert hits.top.tolist() == [2, 4, 0]  # the tie keeps file order
    coords = np.arange(10, dtype=np.int64).reshape(5, 2)
    assert hits.rows(coords)[0] == {"rank": 1, "row": 2, "x": 4, "y": 5, "score": 0.96}
    assert score_tiles(features, query, top_k=50).top.tolist() == [2, 4, 0, 1, 3]
    with pytest.raises(PueError, match="the query vector has 4 dimensions"):
        score_tiles(features, np.ones(4, np.float32), top_k=1)


def _features_file(out: Path, tiling: str, name: str, slide_id: str, bundle: str, source: Path) -> Path:
    coords = np.array([[0, 0], [64, 0], [0, 64], [64, 64]], np.int64)
    rows = np.eye(4, 3, dtype=np.float32)
    stat = source.stat()
    job = {"slide_id": slide_id, "source": {"name": source.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}}
    path = out / tiling / f"features_{name}" / f"{slide_id}.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    coords_attrs = {"patch_size": 32, "patch_size_level0": 64, "overlap": 0}
    write_slide_file(path, "h5", slide_id, coords, rows, coords_attrs, {"bundle_sha256": bundle}, job)
    return path


@pytest.fixture()
def image_slide(tmp_path: Path) -> Path:
    rgb = np.full((128, 128, 3), 240, np.uint8)
    rgb[:64, :64] = (200, 80, 160)
    path = tmp_path / "scans" / "s1.png"
    path.parent.mkdir()
    Image.fromarray(rgb).save(path)
    return path


def test_features_are_found_for_their_bundle_only(tmp_path: Path, image_slide: Path) -> None:
    require("h5py")
    out = tmp_path / "out"
    path = _features_file(out, "20x_32px_0px_overlap", "tiny", "s1", HASH_A, image_slide)
    found = find_features(out, "s1", HASH_A)
    assert found.path == path and found.coords.shape == (4, 2) and found.features.dtype == np.float32
    assert found.coords_attrs["patch_size_level0"] == 64 and found.job["slide_id"] == "s1"
    with pytest.raises(PueError, match=r"made with another bundle .*by bundle aaaaaaaaaaaa.*the bundle given is bbbb"):
        find_features(out, "s1", HASH_B)
    with pytest.raises(PueError, match="no features of slide s2"):
        find_features(out, "s2", HASH_A)
    _features_file(out, "10x_32px_0px_overlap", "tiny", "s1", HASH_A, image_slide)
    with pytest.raises(PueError, match="2 features files made with this bundle.*--tiling"):
        find_features(out, "s1", HASH_A)
    assert find_features(out, "s1", HASH_A, tiling="20x_32px_0px_overlap").path == path


def test_slide_file_comes_from_the_run_records_and_must_be_unchanged(tmp_path: Path, image_slide: Path) -> None:
    require("h5py")
    out = tmp_path / "out"
    features = read_slide_file(_features_file(out, "t", "n", "s1", HASH_A, image_slide))
    with pytest.raises(PueError, match="not where the run records .* say.*--slide-file"):
        find_slide_file(out, features)
    (out / "runs").mkdir()
    record = {"slides": [{"slide_id": "s1", "path": str(image_slide), "status": "done"}]}
    (out / "runs" / "20260101T000000Z-h-1.json").write_text(json.dumps(record))
    assert find_slide_file(out, features) == image_slide
    os.utime(image_slide, ns=(1, 1))  # rescanned under the same name
    with pytest.raises(PueError, match="changed since its features were made"):
        find_slide_file(out, features)
    moved = tmp_path / "elsewhere" / "s1.png"
    moved.parent.mkdir()
    moved.write_bytes(image_slide.read_bytes())
    assert find_slide_file(out, features, moved) == moved
    other = tmp_path / "elsewhere" / "other.png"
    other.write_bytes(b"not the slide")
    with pytest.raises(PueError, match="is not the slide the features of s1 were made from"):
        find_slide_file(out, features, other)


def test_heatmap_colours_tiles_by_score_and_outlines_the_best(image_slide: Path) -> None:
    assert colour_ramp(np.array([0.0, 1.0, 2.0])).tolist() == [[24, 28, 96], [255, 236, 40], [255, 236, 40]]
    reader = open_slide(image_slide, "pillow")
    coords = np.array([[0, 0], [64, 0], [0, 64]], np.int64)
    hits = score_tiles(np.eye(3, dtype=np.float32), np.array([0.0, 0.6, 0.8], np.float32), top_k=1)
    picture = np.asarray(heatmap(reader, coords, 64, hits, "query", max_side=128))
    assert picture.shape == (128 + 34, 128, 3)
    base = np.asarray(reader.thumbnail(128)[0])
    # tile 2 (score 0.8, the best) → the top of the ramp blended 0.6 over the slide; tile 0 (lowest) → its bottom
    expected_best = np.round(base[100, 30] * 0.4 + np.array([255, 236, 40]) * 0.6)
    assert picture[100, 30].tolist() == expected_best.tolist()
    assert picture[30, 30].tolist() == np.round(base[30, 30] * 0.4 + np.array([24, 28, 96]) * 0.6).tolist()
    assert picture[100, 100].tolist() == base[100, 100].tolist()  # no tile there: the slide itself
    assert picture[64, 10].tolist() == [230, 20, 60]  # the best tile's outline
    sheet = contact_sheet(reader, coords, 64, 32, score_tiles(np.eye(3, dtype=np.float32), np.ones(3), top_k=3))
    assert sheet.size == (2 * 192, 2 * (192 + 16))
    assert np.asarray(sheet)[100, 100].tolist() == [200, 80, 160]  # rank 1 (the tie's first row) is tile (0, 0)
