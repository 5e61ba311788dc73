"""pue.embed without a model: inputs (files, folders, globs, CSV), the output layout, HDF5/parquet writers
(TRIDENT's layout, byte-reproducible, atomic)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from slide_files import require

from pue.embed.inputs import resolve_inputs
from pue.embed.layout import OutputLayout
from pue.embed.writers import read_job_attribute, temp_name, write_slide_file
from pue.errors import PueError
from pue.slides.resolution import Resolution


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_inputs_from_files_folders_globs_and_csv(tmp_path: Path) -> None:
    a = _touch(tmp_path / "scans" / "A-1.svs")
    b = _touch(tmp_path / "scans" / "B.ndpi")
    _touch(tmp_path / "scans" / "notes.txt")
    _touch(tmp_path / "scans" / ".hidden.svs")
    c = _touch(tmp_path / "more" / "C.tiff")
    assert [(s.slide_id, s.path) for s in resolve_inputs([str(tmp_path / "scans")])] == [("A-1", a), ("B", b)]
    globbed = resolve_inputs([str(tmp_path / "*" / "*.t*f"), str(a)])
    assert [s.slide_id for s in globbed] == ["C", "A-1"]
    csv = tmp_path / "list.csv"
    csv.write_text(f"slide_id,path,mpp\ncase-7,more/C.tiff,0.25\ncase-8,{a},\n")
    rows = resolve_inputs([str(csv)])
    assert [(s.slide_id, s.path, s.mpp) for s in rows] == [("case-7", c, 0.25), ("case-8", a, None)]


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PueError, match="input not found"):
        resolve_inputs([str(tmp_path / "missing.svs")])
    with pytest.raises(PueError, match="no slide files match"):
        resolve_inputs([str(tmp_path / "*.svs")])
    _touch(tmp_path / "x" / "S.svs")
    _touch(tmp_path / "y" / "S.tif")
    with pytest.raises(PueError, match="two slides have the id S"):
        resolve_inputs([str(tmp_path / "x"), str(tmp_path / "y")])
    bad = tmp_path / "bad.csv"
    bad.write_text("id,file\n")
    with pytest.raises(PueError, match="needs the columns slide_id and path"):
        resolve_inputs([str(bad)])
    negative = tmp_path / "neg.csv"
    negative.write_text("slide_id,path,mpp\ns,x/S.svs,-1\n")
    with pytest.raises(PueError, match="line 2: mpp must be a positive number"):
        resolve_inputs([str(negative)])


def test_layout_names_follow_trident(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path, Resolution(magnification=20), 224, 0, "uni", "h5")
    assert layout.output("s1") == tmp_path / "20x_224px_0px_overlap" / "features_uni" / "s1.h5"
    by_mpp = OutputLayout(tmp_path, Resolution(mpp=0.5), 256, 32, "uni", "parquet")
    assert by_mpp.output("s1") == tmp_path / "0.5mpp_256px_32px_overlap" / "features_uni" / "s1.parquet"


def _write(path: Path, fmt: str, rows: int = 5) -> None:
    coords = np.arange(rows * 2, dtype=np.int64).reshape(rows, 2) * 224
    features = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    coords_attrs = {"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40, "overlap": 0,
                    "target_magnification": 20, "level0_width": 9000, "level0_height": 7000, "level0_mpp": 0.25,
                    "unknown": None}  # fmt: skip
    write_slide_file(path, fmt, "s1", coords, features, coords_attrs, {"encoder": "tiny"}, {"job": 1})


def test_h5_is_trident_layout_and_byte_reproducible(tmp_path: Path) -> None:
    h5py = require("h5py")
    first, second = tmp_path / "a.h5", tmp_path / "b.h5"
    _write(first, "h5")
    time.sleep(1.1)  # a timestamp anywhere in the file would differ now
    _write(second, "h5")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    with h5py.File(first, "r") as handle:  # as TRIDENT's loaders read it
        coords, features = handle["coords"][:], handle["features"][:]
        attrs = dict(handle["coords"].attrs)
        assert handle["features"].attrs["encoder"] == "tiny"
    assert coords.dtype == np.int64 and coords.shape == (5, 2) and features.shape == (5, 8)
    assert attrs["patch_size_level0"] == 448 and attrs["level0_magnification"] == 40 and "unknown" not in attrs
    assert read_job_attribute(first, "h5") == {"job": 1}
    assert not list(tmp_path.glob(".*tmp*"))


def test_parquet_rows_are_fixed_size_lists(tmp_path: Path) -> None:
    require("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "s1.parquet"
    _write(path, "parquet")
    table = pq.read_table(path)
    assert table.column_names == ["slide_id", "x", "y", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert table.num_rows == 5 and table.column("x").to_pylist()[1] == 448
    assert read_job_attribute(path, "parquet") == {"job": 1}


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    require("h5py")
    final = tmp_path / "s1.h5"
    with pytest.raises(PueError, match="internal: 3 feature rows for 5 tiles"):
        write_slide_file(final, "h5", "s1", np.zeros((5, 2)), np.zeros((3, 8), np.float32), {}, {}, {})
    assert not final.exists() and not temp_name(final).exists()
