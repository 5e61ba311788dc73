"""pue-embed slides end to end on the `ci` preset: TRIDENT-layout files with the embeddings of the tiles the
reader gives, reruns skip finished slides and reproduce files byte for byte, parquet and float16, bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from slide_files import SHARED_SLIDE, require, tissue_slide_rgb, write_pyramid
from typer.testing import CliRunner

from pue.cli.embed_app import app

runner = CliRunner()
FEATURES = Path("20x_224px_0px_overlap") / "features_bundle"


def embed(*args: str):
    return runner.invoke(app, ["slides", *args])


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openslide")
    folder = tmp_path_factory.mktemp("scans")
    write_pyramid(folder / "pyr.tif", tissue_slide_rgb(2048, 1536, box=(0.25, 0.3, 0.7, 0.75)), mpp=0.25)
    write_pyramid(folder / "glass.tif", tissue_slide_rgb(1024, 1024, seed=3), mpp=0.5, levels=2)
    return folder


@pytest.fixture(scope="module")
def bundle(fp32_bundle: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ci bundle under the folder name `bundle` (the default features_<name>)."""
    link = tmp_path_factory.mktemp("bundles") / "bundle"
    link.symlink_to(fp32_bundle("llava_next", "ci"))
    return link


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom pue.cli.embed_app import app\n"
        "for args in (['--help'], ['slides', '--help'], ['search', '--help']):\n"
        "    r = CliRunner().invoke(app, args)\n    assert r.exit_code == 0, r.output\n"
        "heavy = ('torch', 'transformers', 'onnx', 'onnxruntime', 'h5py', 'openslide', 'ray')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    script = Path(sys.executable).parent / "pue-embed"
    completed = subprocess.run([str(script), "slides", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0 and "--coords-from" in completed.stdout


def test_mag_and_mpp_are_exclusive(tmp_path: Path) -> None:
    result = embed(str(tmp_path), "-o", str(tmp_path / "out"), "--bundle", str(tmp_path), "--mag", "20", "--mpp", "0.5")
    assert result.exit_code == 2 and "mutually exclusive" in result.output


def test_slides_end_to_end(slides_dir: Path, bundle: Path, tmp_path: Path) -> None:
    h5py = require("h5py")
    from pue.runtime import Embedder
    from pue.slides.readers import open_slide

    out = tmp_path / "out"
    result = embed(str(slides_dir), "-o", str(out), "--bundle", str(bundle), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["counts"] == {"done": 2} and summary["tiles"] == 6
    assert summary["tiles_per_s"] > 0 and summary["reader_tiles_per_s"] > 0
    with h5py.File(out / FEATURES / "pyr.h5", "r") as handle:
        coords, features = handle["coords"][:], handle["features"][:]
        attrs = dict(handle["coords"].attrs)
        features_attrs = dict(handle["features"].attrs)
    # 224 px at 20x of a 0.25 µm/px scan: 448 level-0 px, read from level 1; tiles overlapping the tissue block
    assert {tuple(xy) for xy in coords.tolist()} == {(x, y) for x in (448, 896, 1344) for y in (448, 896)}
    assert coords.dtype == np.int64 and features.shape == (6, 64) and features.dtype == np.float32
    assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["overlap"]) == (224, 448, 0)
    assert (attrs["level0_magnification"], attrs["target_magnification"]) == (40, 20)
    assert (attrs["level0_width"], attrs["level0_height"], attrs["level0_mpp"]) == (2048, 1536, 0.25)
    assert features_attrs["precision"] == "fp32" and len(features_attrs["bundle_sha256"]) == 64
    assert "pue_version" in features_attrs and features_attrs["name"] == "bundle"
    # the vectors are the runtime's for the tiles the reader gives, row for row
    reader = open_slide(slides_dir / "pyr.tif")
    tiles = [reader.read(int(x), int(y), 448, 224) for x, y in coords]
    with Embedder.load(bundle) as embedder:
        expected = embedder.embed_images(tiles)
    assert np.abs(features - expected).max() < 1e-5
    # an all-glass slide gets an empty (0, D) file, as TRIDENT writes
    with h5py.File(out / FEATURES / "glass.h5", "r") as handle:
        assert handle["coords"].shape == (0, 2) and handle["features"].shape == (0, 64)
    # a rerun skips both (and, asked for --thumbnails, draws the pictures the first run did not, embedding nothing);
    # a second output folder gets byte-identical files
    thumbnails = out / "20x_224px_0px_overlap" / "thumbnails"
    assert not thumbnails.exists()
    again = embed(str(slides_dir), "-o", str(out), "--bundle", str(bundle), "--json", "--thumbnails")
    assert json.loads(again.stdout[again.stdout.index("{") :])["counts"] == {"skipped": 2}
    assert sorted(p.name for p in thumbnails.iterdir()) == ["glass.png", "pyr.png"]
    other = tmp_path / "other"
    assert embed(str(slides_dir / "pyr.tif"), "-o", str(other), "--bundle", str(bundle)).exit_code == 0
    assert (other / FEATURES / "pyr.h5").read_bytes() == (out / FEATURES / "pyr.h5").read_bytes()
    records = sorted((out / "runs").glob("*.json"))
    assert len(records) == 2 and json.loads(records[0].read_text())["slides"][0]["status"] == "done"


def test_parquet_float16_mpp_and_coords_from(slides_dir: Path, bundle: Path, tmp_path: Path) -> None:
    h5py = require("h5py")
    require("pyarrow")
    import pyarrow.parquet as pq

    pyr = str(slides_dir / "pyr.tif")
    parquet = embed(pyr, "-o", str(tmp_path / "pq"), "--bundle", str(bundle), "--format", "parquet", "--mpp", "0.5")
    assert parquet.exit_code == 0, parquet.output
    table = pq.read_table(tmp_path / "pq" / "0.5mpp_224px_0px_overlap" / "features_bundle" / "pyr.parquet")
    assert table.num_rows == 6 and set(table.column("slide_id").to_pylist()) == {"pyr"}
    # TRIDENT's coordinates file: exactly those tiles, float16 features
    patches = tmp_path / "trident" / "patches"
    patches.mkdir(parents=True)
    with h5py.File(patches / "pyr_patches.h5", "w") as handle:
        dataset = handle.create_dataset("coords", data=np.array([[0, 0], [896, 448]], np.int64))
        dataset.attrs.update({"patch_size": 224, "patch_size_level0": 448, "target_magnification": 20, "overlap": 0})
    result = embed(
        pyr, "-o", str(tmp_path / "cf"), "--bundle", str(bundle), "--coords-from", str(tmp_path / "trident"),
        "--dtype", "float16", "--name", "tiny", "--thumbnails",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "cf" / "20x_224px_0px_overlap" / "features_tiny" / "pyr.h5", "r") as handle:
        assert handle["coords"][:].tolist() == [[0, 0], [896, 448]]
        assert handle["features"].dtype == np.float16 and handle["coords"].attrs["tissue_rule"] == "coords-from"
    # the picture of a --coords-from run: the slide's own thumbnail, the two given tiles outlined
    assert (tmp_path / "cf" / "20x_224px_0px_overlap" / "thumbnails" / "pyr.png").stat().st_size > 0
    with h5py.File(tmp_path / "pq" / ".." / "cf" / "20x_224px_0px_overlap" / "features_tiny" / "pyr.h5", "r") as h:
        assert h["coords"].attrs["patch_size_level0"] == 448


@pytest.mark.skipif(not SHARED_SLIDE.is_file(), reason="the shared SVS is not present")
def test_shared_svs_at_10x_with_overlap(bundle: Path, tmp_path: Path) -> None:
    h5py = require("h5py")
    result = embed(str(SHARED_SLIDE), "-o", str(tmp_path), "--bundle", str(bundle), "--mag", "10", "--overlap", "32")
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "10x_224px_32px_overlap" / "features_bundle" / "cmu_small_region.h5", "r") as handle:
        coords, attrs = handle["coords"][:], dict(handle["coords"].attrs)
    assert attrs["patch_size_level0"] == 448 and attrs["overlap"] == 32 and attrs["level0_magnification"] == 20
    assert set(np.unique(coords[:, 0] % 384)) == {0} and len(coords) >= 10  # stride 448 - 64


def test_slides_on_a_qwen3_bundle(slides_dir: Path, qwen3_embedding_bundle: Path, tmp_path: Path) -> None:
    """The slide job on a Qwen3-VL bundle (patch-layout vision input, DeepStack, a Matryoshka cut to 32): the
    vectors are the runtime's for the tiles the reader gives."""
    h5py = require("h5py")
    from qwen_helpers import MATRYOSHKA_CUT

    from pue.runtime import Embedder
    from pue.slides.readers import open_slide

    result = embed(str(slides_dir / "pyr.tif"), "-o", str(tmp_path), "--bundle", str(qwen3_embedding_bundle))
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / FEATURES / "pyr.h5", "r") as handle:
        coords, features = handle["coords"][:], handle["features"][:]
    assert features.shape == (6, MATRYOSHKA_CUT) and features.dtype == np.float32
    reader = open_slide(slides_dir / "pyr.tif")
    with Embedder.load(qwen3_embedding_bundle) as embedder:
        expected = embedder.embed_images([reader.read(int(x), int(y), 448, 224) for x, y in coords])
    assert np.abs(features - expected).max() < 1e-5
