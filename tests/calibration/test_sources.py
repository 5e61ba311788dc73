"""Calibration patch sources: the shipped set, folders of images (sampling: test_sampling.py; slides:
test_slide_source.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from patch_images import image_folder
from PIL import Image

from pue.calibration.sampling import sample_patches
from pue.calibration.sources import FolderSource, ShippedSource, list_images, open_sources
from pue.data import patch_index, patch_set, patches_dir
from pue.errors import PueError
from pue.slides.tissue import TissueFilter

# ---- shipped ---------------------------------------------------------------------------------------------


def test_shipped_source_gives_every_calibration_patch() -> None:
    patches = ShippedSource().candidates()
    files = patch_set("calibration")
    assert len(patches) == len(files) == 189
    assert [patches_dir() / p.file for p in patches] == files
    entries = {e["file"]: e for e in patch_index()}
    for patch in patches:
        entry = entries[patch.file]
        assert patch.source == "shipped:calibration"
        assert (patch.x, patch.y, patch.size, patch.level, patch.mpp) == (
            entry["x"],
            entry["y"],
            entry["size"],
            entry["level"],
            entry["mpp"],
        )
        assert patch.origin == entry["source"]
    image = patches[0].load()
    assert image.mode == "RGB" and image.size == (224, 224)
    record = patches[0].to_dict()
    assert json.loads(json.dumps(record)) == record
    assert set(record) == {"source", "x", "y", "size", "level", "mpp", "extent", "file", "origin"}


def test_no_paths_means_the_shipped_set() -> None:
    for paths in (None, []):
        sources = open_sources(paths)
        assert len(sources) == 1 and isinstance(sources[0], ShippedSource)
    with pytest.raises(PueError, match="unknown patch set"):
        ShippedSource("nope").candidates()


# ---- folders ---------------------------------------------------------------------------------------------


def test_folder_counts_and_names_unreadable_files(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "calib", 5)
    shutil.copy(patch_set("calibration")[0], folder / "shipped.jpg")
    good = (folder / "img_00.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "readme.txt").write_text("ignored: not an image suffix\n")
    (folder / ".hidden.png").write_text("ignored: hidden\n")

    assert [p.name for p in list_images(folder)] == [
        "img_00.png",
        "img_01.png",
        "img_02.png",
        "img_03.png",
        "img_04.png",
        "notes.png",
        "shipped.jpg",
        "truncated.png",
    ]
    source = FolderSource(folder)
    patches = source.candidates()
    assert len(patches) == 6
    assert all(p.x is None and p.size is None for p in patches)
    assert patches[-1].load().size == (224, 224)
    bad = dict(source.unreadable)
    assert set(bad) == {str(folder / "notes.png"), str(folder / "truncated.png")}
    assert "not an image file" in bad[str(folder / "notes.png")]
    assert "truncated or corrupt" in bad[str(folder / "truncated.png")]

    chosen, summary = sample_patches([source], 4, minimum=2)
    assert len(chosen) == 4
    assert {entry["file"] for entry in summary["unreadable"]} == set(bad)
    assert summary["sources"][0]["unreadable"] == 2 and summary["sources"][0]["available"] == 6


def test_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PueError, match="no image files"):
        open_sources([empty])
    (empty / "notes.txt").write_text("x")
    with pytest.raises(PueError, match="no image files"):
        list_images(empty)
    with pytest.raises(PueError, match="not found"):
        open_sources([tmp_path / "missing"])
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(PueError, match="neither a folder"):
        open_sources([tmp_path / "table.csv"])


def test_recursive_folder(tmp_path: Path) -> None:
    image_folder(tmp_path / "a", 2)
    image_folder(tmp_path / "a" / "sub", 3, prefix="deep")
    assert len(FolderSource(tmp_path / "a").candidates()) == 2
    assert len(FolderSource(tmp_path / "a", recursive=True).candidates()) == 5


def test_single_image_file_is_a_source(tmp_path: Path) -> None:
    image_folder(tmp_path, 1)
    (source,) = open_sources([tmp_path / "img_00.png"])
    assert isinstance(source, FolderSource)
    assert [p.source for p in source.candidates()] == [str(tmp_path / "img_00.png")]


def test_folder_tissue_filter_is_optional(tmp_path: Path) -> None:
    folder = image_folder(tmp_path, 3)
    Image.new("RGB", (64, 64), (242, 242, 240)).save(folder / "glass.png")
    assert len(FolderSource(folder).candidates()) == 4
    filtered = FolderSource(folder, tissue_filter=TissueFilter())
    assert len(filtered.candidates()) == 3
    assert filtered.background == [str(folder / "glass.png")]
    assert filtered.describe()["background"] == 1
