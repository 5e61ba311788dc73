"""Bundle integrity at load: format version, hashes, sizes, names that leave the bundle, atomic writes."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from pue.bundle import atomic_directory, read_manifest, verify_files
from pue.errors import BundleError, OutputExistsError
from pue.runtime import Embedder


@pytest.fixture
def bundle(fp32_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(fp32_bundle(), copy)
    return copy


def edit_manifest(bundle, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_format_version_checked(bundle):
    edit_manifest(bundle, lambda d: d.update(format_version=99))
    with pytest.raises(BundleError, match="format_version is 99"):
        Embedder.load(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json"):
        Embedder.load(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        Embedder.load(tmp_path / "nope")


def test_hash_mismatch_refused_and_opt_out_logged(bundle, caplog):
    tokenizer = bundle / "tokenizer.json"
    text = tokenizer.read_text()
    tokenizer.write_text(text.replace('"', "'", 1)[: len(text)])  # same size, other bytes
    with pytest.raises(BundleError, match="tokenizer.json"):
        Embedder.load(bundle)
    manifest = read_manifest(bundle)
    with caplog.at_level(logging.WARNING):
        verify_files(bundle, manifest, check_hashes=False)
    assert "skipped" in caplog.text


def test_truncated_file_refused(bundle):
    graph = bundle / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(BundleError, match="decoder.onnx"):
        Embedder.load(bundle, verify_hashes=False)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.onnx", "sub/../../outside.onnx"])
def test_names_leaving_the_bundle_refused(bundle, name):
    edit_manifest(bundle, lambda d: d["graphs"]["vision"]["file"].update(path=name))
    with pytest.raises(BundleError, match="outside|absolute|leaves"):
        Embedder.load(bundle)


def test_symlink_pointing_out_refused(bundle, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "vision.onnx", outside)
    os.remove(bundle / "vision.onnx")
    os.symlink(outside, bundle / "vision.onnx")
    with pytest.raises(BundleError, match="outside the bundle"):
        Embedder.load(bundle)


def test_atomic_directory(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(OutputExistsError):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as staging:
            (staging / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_directory(out, overwrite=True) as staging:
        (staging / "a.txt").write_text("second")
    assert (out / "a.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
