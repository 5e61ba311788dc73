"""pue.derive: one way to derive a bundle: lineage, links, gate, atomic commit or nothing."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pue.bundle import manifest_sha256, read_manifest, verify_files
from pue.derive import derive_bundle
from pue.errors import GateFailedError, PueError
from pue.fidelity import measure_fidelity


@pytest.fixture
def parent(fp32_bundle, tmp_path):
    copy = tmp_path / "parent"
    shutil.copytree(fp32_bundle(), copy)
    return copy


def passing():
    return measure_fidelity({"images": np.eye(3)}, {"images": np.eye(3)})


def failing():
    return measure_fidelity({"images": np.eye(3)[[1, 0, 2]]}, {"images": np.eye(3)})


def test_a_child_links_unchanged_files_records_lineage_and_commits(parent, tmp_path):
    out = tmp_path / "child"
    with derive_bundle(parent, out) as child:
        for spec in child.parent.graphs.values():
            child.link_from_parent(spec.file.path)
        child.link_from_parent(child.parent.tokenizer.file.path)
        manifest = child.child_manifest(precision="fp32", target="onnxruntime")
        child.gate(passing(), "fidelity gate")
        child.write_json("fidelity.json", passing().to_dict())
        child.commit(manifest, ["fidelity.json"])
    written = read_manifest(out)
    verify_files(out, written)
    assert written.lineage.parent_sha256 == manifest_sha256(parent)
    assert written.lineage.parent_precision == "fp32" and list(written.files) == ["fidelity.json"]
    assert os.stat(out / "vision.onnx").st_ino == os.stat(parent / "vision.onnx").st_ino  # a link, not a copy


def test_a_failed_gate_leaves_no_bundle_and_the_earlier_output_untouched(parent, tmp_path):
    out = tmp_path / "child"
    out.mkdir()
    (out / "earlier.txt").write_text("results of yesterday")
    with pytest.raises(GateFailedError), derive_bundle(parent, out, overwrite=True) as child:
        child.link_from_parent(child.parent.tokenizer.file.path)
        child.gate(failing(), "fidelity gate", {"precision": "int8"})
    assert (out / "earlier.txt").read_text() == "results of yesterday"
    report = json.loads((tmp_path / "child.gate-failed.json").read_text())
    assert report["parent"] == str(parent) and report["precision"] == "int8"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_derivation_never_committed_is_a_bug_and_writes_nothing(parent, tmp_path):
    out = tmp_path / "child"
    with pytest.raises(PueError, match="never committed"), derive_bundle(parent, out):
        pass
    assert not out.exists()


def test_existing_output_is_refused_and_a_tampered_parent_too(parent, tmp_path):
    out = tmp_path / "child"
    out.mkdir()
    with pytest.raises(PueError, match="--overwrite"), derive_bundle(parent, out):
        pass
    data = bytearray((parent / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (parent / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(PueError, match="sha256"), derive_bundle(parent, tmp_path / "other"):
        pass
