"""pue-embed search end to end on the `ci` preset and the shared CC0 SVS: the scores are the cosines between the
slide's stored features and the query the bundle embeds (text, composed), the pictures are written, and another
bundle, a missing query or existing pictures are refused with one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slide_files import SHARED_SLIDE, require
from typer.testing import CliRunner

from pue.cli.embed_app import app

runner = CliRunner()
SLIDE = "cmu_small_region"


@pytest.fixture(scope="module")
def embedded(fp32_bundle: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shared slide embedded at 10x with the ci bundle: (output root, bundle)."""
    require("h5py")
    if not SHARED_SLIDE.is_file():
        pytest.skip("the shared SVS is not present")
    bundle = fp32_bundle("llava_next", "ci")
    out = tmp_path_factory.mktemp("search") / "out"
    arguments = ["slides", str(SHARED_SLIDE), "-o", str(out), "--bundle", str(bundle), "--mag", "10", "--name", "ci"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    return out, bundle


def _search(out: Path, bundle: Path, *args: str):
    return runner.invoke(app, ["search", str(out), "--slide", SLIDE, "--bundle", str(bundle), *args])


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_text_and_composed_queries_score_every_tile(embedded: tuple[Path, Path], tmp_path: Path) -> None:
    import h5py

    from pue.runtime import Embedder

    out, bundle = embedded
    text = "tumour cells with mitoses"
    found = _json(_search(out, bundle, "--text", text, "--top-k", "4", "--json", "--report", str(tmp_path)))
    with h5py.File(out / "10x_224px_0px_overlap" / "features_ci" / f"{SLIDE}.h5", "r") as handle:
        features, coords = handle["features"][:], handle["coords"][:]
    tile = tmp_path / "tile.png"
    Image.open(SHARED_SLIDE).crop((448, 448, 896, 896)).resize((224, 224)).save(tile)
    with Embedder.load(bundle) as embedder:
        expected = features @ embedder.embed_texts([text])[0]
        composed = features @ embedder.embed_composed([tile], ["with necrosis"])[0]
    assert found["tiles"] == len(coords) > 4 and found["query"]["kind"] == "text"
    np.testing.assert_allclose(found["scores"], expected, atol=2e-6)
    best = np.argsort(-expected, kind="stable")[:4]
    assert [row["row"] for row in found["top"]] == best.tolist()
    assert [[row["x"], row["y"]] for row in found["top"]] == coords[best].tolist()
    heat, sheet = Image.open(found["heatmap"]), Image.open(found["contact_sheet"])
    assert heat.format == sheet.format == "PNG" and max(heat.size) <= 1024 + 34 and sheet.size == (384, 416)
    assert found["contact_sheet"].endswith(".top4.png") and Path(found["heatmap"]).parent == tmp_path

    both = _json(_search(out, bundle, "--text", "with necrosis", "--image", str(tile), "--json"))
    assert both["query"]["kind"] == "composed" and len(both["top"]) == 16
    np.testing.assert_allclose(both["scores"], composed, atol=2e-6)
    assert Path(both["heatmap"]).parent == out / "10x_224px_0px_overlap" / "search_ci"
    again = _search(out, bundle, "--text", "with necrosis", "--image", str(tile))
    assert again.exit_code == 1 and "already exists" in again.output and "--overwrite" in again.output


def test_another_bundle_and_no_query_are_refused(embedded: tuple[Path, Path], tmp_path: Path) -> None:
    out, bundle = embedded
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")  # the same graphs, another manifest: another bundle identity
    refused = _search(out, other, "--text", "stroma")
    assert refused.exit_code == 1
    assert "were made with another bundle" in refused.output and "pass the bundle the features" in refused.output
    assert not (out / "10x_224px_0px_overlap" / "search_ci").exists() or not list(
        (out / "10x_224px_0px_overlap" / "search_ci").glob("*stroma*")
    )
    empty = _search(out, bundle)
    assert empty.exit_code == 2 and "give --text, --image or both" in empty.output
