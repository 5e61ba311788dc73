"""Manifest format versions (docs/architecture.md): 1.1 bundles read with no image separator (one image per row),
1.2 writes it, 1.3 records the vision input layout and the positions, a 1.2 manifest (without them) still reads,
a newer minor's unknown prompt fields are ignored, another major is refused."""

from __future__ import annotations

import json

import pytest
import tiny_bundle

from pue.bundle import FORMAT_VERSION, read_manifest
from pue.errors import BundleError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle.make_tiny_bundle(tmp_path_factory.mktemp("versions") / "bundle")


def rewritten(bundle, tmp_path, change):
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def test_this_pue_writes_format_1_4_with_the_separator(bundle):
    data = json.loads((bundle / "manifest.json").read_text())
    assert FORMAT_VERSION == "1.4" and data["format_version"] == "1.4"
    assert data["prompts"]["image_separator"] == " "
    assert read_manifest(bundle).prompts.image_separator == " "


def test_a_1_2_manifest_reads_without_vision_input_and_positions(bundle, tmp_path):
    def to_1_2(data):
        data["format_version"] = "1.2"
        data.get("export", {}).pop("vision_input", None)
        data.get("export", {}).pop("positions", None)

    manifest = read_manifest(rewritten(bundle, tmp_path, to_1_2))
    assert manifest.export.vision_input == {} and manifest.export.positions == {}
    assert manifest.prompts.image_separator == " " and manifest.preprocessing.kind != "patches"


def test_a_1_3_manifest_reads_without_deepstack(bundle, tmp_path):
    def to_1_3(data):
        data["format_version"] = "1.3"
        data.get("export", {}).pop("deepstack", None)

    manifest = read_manifest(rewritten(bundle, tmp_path, to_1_3))
    assert manifest.export.deepstack == {} and manifest.embedding_dim == manifest.hidden_size


def test_a_1_1_manifest_has_no_separator(bundle, tmp_path):
    def to_1_1(data):
        data["format_version"] = "1.1"
        del data["prompts"]["image_separator"]

    manifest = read_manifest(rewritten(bundle, tmp_path, to_1_1))
    assert manifest.prompts.image_separator is None


def test_a_newer_minor_is_read_for_the_fields_this_pue_knows(bundle, tmp_path):
    def to_1_9(data):
        data["format_version"] = "1.9"
        data["prompts"]["video_placeholder"] = "<video>"

    manifest = read_manifest(rewritten(bundle, tmp_path, to_1_9))
    assert manifest.prompts.image_separator == " " and not hasattr(manifest.prompts, "video_placeholder")


def test_another_major_is_refused(bundle, tmp_path):
    with pytest.raises(BundleError, match="format_version is 2.0"):
        read_manifest(rewritten(bundle, tmp_path, lambda d: d.update(format_version="2.0")))
