"""pue-embed on bad slides: truncated, corrupted tile data (fails mid-read), not a slide, no resolution metadata.
Without --skip-errors the job stops at the first with one line naming it (earlier slides kept); with it every bad
slide is recorded with its reason and the job goes on; either way the exit code is 1. --assume-mpp rescues the
slide without metadata."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from slide_files import corrupted_copy, require, tissue_slide_rgb, truncated_copy, write_pyramid
from typer.testing import CliRunner

from pue.cli.embed_app import app

FEATURES = Path("20x_224px_0px_overlap") / "features_ci"


@pytest.fixture(scope="module")
def bad_scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openslide")
    require("h5py")
    folder = tmp_path_factory.mktemp("bad")
    good = write_pyramid(folder / "a_good.tif", tissue_slide_rgb(1792, 1344, box=(0.2, 0.2, 0.8, 0.8)), mpp=0.25)
    truncated_copy(good, folder / "b_truncated.tif")
    corrupted_copy(good, folder / "c_corrupt.tif")
    (folder / "d_notaslide.svs").write_text("hello, not a slide\n")
    write_pyramid(folder / "e_nompp.tif", tissue_slide_rgb(1024, 1024, box=(0.2, 0.2, 0.8, 0.8)), mpp=None, levels=2)
    return folder


def _embed(bad_scans: Path, out: Path, bundle: Path, *extra: str):
    args = ["slides", str(bad_scans), "-o", str(out), "--bundle", str(bundle), "--name", "ci", *extra]
    return CliRunner().invoke(app, args)


def test_stops_at_the_first_bad_slide(bad_scans: Path, fp32_bundle: Callable[..., Path], tmp_path: Path) -> None:
    result = _embed(bad_scans, tmp_path, fp32_bundle("llava_next", "ci"))
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "slide b_truncated" in errors[0] and "truncated or corrupt" in errors[0]
    assert "--skip-errors" in errors[0] and "Traceback" not in result.output
    assert [p.name for p in (tmp_path / FEATURES).glob("*.h5")] == ["a_good.h5"]  # the earlier slide is kept
    record = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert record["state"] == "failed" and [s["status"] for s in record["slides"]] == ["done", "failed"]


def test_skip_errors_records_each_reason(bad_scans: Path, fp32_bundle: Callable[..., Path], tmp_path: Path) -> None:
    bundle = fp32_bundle("llava_next", "ci")
    result = _embed(bad_scans, tmp_path, bundle, "--skip-errors", "--json")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["counts"] == {"done": 1, "failed": 4}
    reasons = {failure["slide_id"]: failure["error"] for failure in summary["failed"]}
    assert "truncated or corrupt" in reasons["b_truncated"]
    assert "could not be read" in reasons["c_corrupt"] and "corrupt" in reasons["c_corrupt"]  # fails mid-read
    assert "neither openslide nor Pillow" in reasons["d_notaslide"]
    assert "--assume-mpp" in reasons["e_nompp"]
    assert sorted(p.name for p in (tmp_path / FEATURES).glob("*")) == [".locks", "a_good.h5"]  # no partial outputs
    assert not list((tmp_path / FEATURES / ".locks").iterdir())  # every lock released
    # the resolution-less slide, given its µm/px; the rerun skips the good one and fails the broken ones again
    rescued = _embed(bad_scans, tmp_path, bundle, "--skip-errors", "--assume-mpp", "0.5", "--json")
    counts = json.loads(rescued.stdout[rescued.stdout.index("{") :])["counts"]
    assert counts == {"done": 1, "failed": 3, "skipped": 1}
    assert (tmp_path / FEATURES / "e_nompp.h5").is_file()
