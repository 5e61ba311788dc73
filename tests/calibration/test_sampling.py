"""Sampling calibration patches from their sources: minimum and unreadable counts, determinism per seed, quotas
stratified across sources."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
from patch_images import image_folder
from PIL import Image

from pue.calibration.sampling import _quotas, sample_check_patches, sample_patches
from pue.calibration.sources import FolderSource, ShippedSource, open_sources
from pue.errors import PueError
from pue.slides.tissue import TissueFilter


def test_below_minimum_names_counts_and_unreadable(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "few", 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(PueError) as info:
        sample_patches([FolderSource(folder)], 16, minimum=8)
    message = str(info.value)
    assert "only 3 usable calibration patches, fewer than the minimum of 8" in message
    assert f"{folder}: 3 usable, 1 unreadable" in message
    assert str(folder / "broken.jpg") in message


def test_all_unreadable_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("no")
    (tmp_path / "b.jpg").write_text("no")
    with pytest.raises(PueError, match="only 0 usable") as info:
        sample_patches(open_sources([tmp_path]), 4)
    assert "a.png" in str(info.value) and "b.jpg" in str(info.value)


def test_more_requested_than_available_warns_and_uses_all(tmp_path: Path) -> None:
    source = FolderSource(image_folder(tmp_path, 10))
    with pytest.warns(UserWarning, match="20 calibration patches requested but only 10 are usable"):
        chosen, summary = sample_patches([source], 20)
    assert len(chosen) == 10 and summary["used"] == 10 and summary["requested"] == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(sample_patches([source], 10)[0]) == 10


def test_sampling_is_deterministic_per_seed() -> None:
    sources = [ShippedSource()]
    first, summary = sample_patches(sources, 24, seed=0)
    again, _ = sample_patches([ShippedSource()], 24, seed=0)
    other, _ = sample_patches([ShippedSource()], 24, seed=1)
    assert first == again
    assert first != other
    assert len(set(first)) == 24
    assert summary["seed"] == 0 and summary["used"] == 24
    assert summary["tissue_filter"] == TissueFilter().to_dict()


def test_sampling_is_stratified_across_sources(tmp_path: Path) -> None:
    small = FolderSource(image_folder(tmp_path / "small", 5))
    medium = FolderSource(image_folder(tmp_path / "medium", 30))
    chosen, summary = sample_patches([ShippedSource(), medium], 40, seed=3)
    assert [s["used"] for s in summary["sources"]] == [20, 20]
    assert sum(p.source == "shipped:calibration" for p in chosen) == 20
    # a source that cannot fill its share gives all it has; the others make up the rest
    chosen, summary = sample_patches([small, medium, ShippedSource()], 41, seed=3)
    assert [s["used"] for s in summary["sources"]] == [5, 18, 18]
    assert len(chosen) == 41 and len(set(chosen)) == 41


def test_quotas() -> None:
    assert _quotas([5, 100, 100], 30) == [5, 13, 12]
    assert _quotas([10, 10], 20) == [10, 10]
    assert _quotas([0, 7], 5) == [0, 5]
    assert _quotas([3, 3, 3], 2) == [1, 1, 0]
    assert _quotas([2, 50], 52) == [2, 50]


def test_bad_num_patches() -> None:
    with pytest.raises(PueError, match="positive integer"):
        sample_patches([ShippedSource()], 0)
    with pytest.raises(PueError, match="no calibration sources"):
        sample_patches([], 4)


def test_check_patches_are_patches_the_fit_did_not_read() -> None:
    sources = [ShippedSource()]
    chosen, _ = sample_patches(sources, 16, seed=3)
    check, summary = sample_check_patches(sources, chosen, 16, seed=3)
    assert summary == {"requested": 16, "unseen": 16, "transformed": 0}
    assert len(check) == 16 and not set(check) & set(chosen)
    assert all(patch.transform is None for patch in check)
    again, _ = sample_check_patches(sources, chosen, 16, seed=3)
    assert again == check  # seeded
    other, _ = sample_check_patches(sources, chosen, 16, seed=4)
    assert other != check


def test_check_patches_turn_fitted_ones_when_the_sources_have_no_more(tmp_path: Path) -> None:
    source = FolderSource(image_folder(tmp_path, 10))
    chosen, _ = sample_patches([source], 8)
    check, summary = sample_check_patches([source], chosen, 9)
    assert summary == {"requested": 9, "unseen": 2, "transformed": 7}
    assert not set(check[:2]) & set(chosen)
    turned = check[2:]
    assert [p.transform for p in turned] == ["rotate_90"] * 7
    assert [dataclasses.replace(p, transform=None) for p in turned] == chosen[:7]
    original, mirrored = chosen[0].load(), turned[0].load()
    assert mirrored.tobytes() == original.transpose(Image.Transpose.ROTATE_90).tobytes()
    assert turned[0].to_dict()["transform"] == "rotate_90" and "transform" not in chosen[0].to_dict()
    # never more than the seven symmetries of each fitted patch
    _, most = sample_check_patches([source], chosen[:1], 64)
    assert most == {"requested": 64, "unseen": 9, "transformed": 7}
