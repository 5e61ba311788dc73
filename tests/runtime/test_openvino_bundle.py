"""OpenVINO on real tiny bundles (`ci` preset): fp32 in f32 equals onnxruntime, and the gated bf16 deployment
(`pue-export quantize --precision bf16 --target openvino`): refused on a CPU without bf16, hard-linked graphs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from pue.bundle import file_entry, read_manifest, write_manifest
from pue.cli.export_app import app
from pue.data import patch_set
from pue.errors import EXIT_ERROR
from pue.precisions import lookup
from pue.runtime import Embedder
from pue.runtime.backends import openvino as ov_backend

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

TEXTS = ["invasive ductal carcinoma", "normal colon mucosa with goblet cells", ""]
MODIFIERS = ["as IHC", "more stroma"]
STAND_IN = "decoder.weights.stand-in"  # a 32 GB fp32 weights file of an 8 B model, scaled down (sparse)
STAND_IN_BYTES = 256 * 2**20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ov_backend.CACHE_ENV, str(tmp_path / "ov-cache"))


def embed_all(embedder):
    images = patch_set("heldout")[:6]
    return {
        "images": embedder.embed_images(images),
        "texts": embedder.embed_texts(TEXTS),
        "composed": embedder.embed_composed(images[:2], MODIFIERS),
    }


def test_fp32_bundle_in_f32_equals_onnxruntime(fp32_bundle, cache):
    bundle = fp32_bundle("llava_next", "ci")
    with Embedder.load(bundle, backend="onnxruntime") as ort, Embedder.load(bundle, backend="openvino") as ov:
        assert ov.backend.inference_precision == "f32"
        expected, got = embed_all(ort), embed_all(ov)
        assert ov.stage_times()["vision"] > 0 and ov.stage_times()["decoder"] > 0
    for kind in expected:
        cosines = np.sum(expected[kind] * got[kind], axis=1)
        assert cosines.min() >= 0.99999, (kind, cosines)


@pytest.mark.skipif(ov_backend.cpu_bf16_support(), reason="this CPU has native bf16: the real gates run instead")
@pytest.mark.parametrize("precision", ["bf16", "int8-bf16", "int8-dynamic-bf16"])
def test_bf16_deployments_are_refused_before_any_work_on_a_cpu_without_bf16(fp32_bundle, tmp_path, precision):
    """bf16, and the two INT8 precisions with bf16 for the rest: their gate would measure f32 and prove nothing."""
    out = tmp_path / "bf16"
    bundle = fp32_bundle("llava_next", "ci")
    result = CliRunner().invoke(
        app, ["quantize", str(bundle), "-o", str(out), "--precision", precision, "--target", "openvino"]
    )
    assert result.exit_code == EXIT_ERROR, result.output
    assert "needs native bf16 in the CPU" in result.output and "AMX" in result.output
    assert not out.exists() and not list(tmp_path.glob("*gate-failed*"))


@pytest.mark.skipif(
    not ov_backend.cpu_bf16_support(),
    reason="this CPU has no native bf16 (OpenVINO lists no BF16 capability): the bf16 gate cannot be measured here",
)
def test_bf16_deployment_is_gated_on_a_cpu_with_bf16(fp32_bundle, tmp_path, cache):
    out = tmp_path / "bf16"
    bundle = fp32_bundle("llava_next", "ci")
    result = CliRunner().invoke(
        app, ["quantize", str(bundle), "-o", str(out), "--precision", "bf16", "--target", "openvino", "--json"]
    )
    assert result.exit_code == 0, result.output
    with Embedder.load(out) as bf16:
        assert bf16.backend_name == "openvino" and bf16.backend.inference_precision == "bf16"
    report = json.loads((out / "fidelity.json").read_text())
    assert report["gate"]["passed"] and "bf16" in report["gate_device"]


def with_stand_in(bundle, tmp_path):
    """A copy of `bundle` whose decoder lists one more weights file, sparse and STAND_IN_BYTES long."""
    copy = tmp_path / "fp32"
    shutil.copytree(bundle, copy)
    with open(copy / STAND_IN, "wb") as handle:
        handle.truncate(STAND_IN_BYTES)
    manifest = read_manifest(copy)
    manifest.graphs["decoder"].external_data.append(file_entry(copy, STAND_IN))
    write_manifest(copy, manifest)
    return copy


def test_bf16_bundle_hard_links_the_fp32_graphs(fp32_bundle, tmp_path, cache, monkeypatch):
    """The derivation and its gate, on this CPU: told it has bf16 and letting OpenVINO compute in f32 (what it does
    here anyway), so only the precision is pretended; the links, manifest, gate record and atomic commit are real."""
    from pue.calibration.runtime_precision import derive_runtime_precision

    parent = with_stand_in(fp32_bundle("llava_next", "ci"), tmp_path)
    monkeypatch.setattr(ov_backend, "cpu_bf16_support", lambda core=None: True)
    monkeypatch.setitem(ov_backend.INFERENCE_TYPES, "bfloat16", "f32")
    out = tmp_path / "bf16"
    result = derive_runtime_precision(parent, out, lookup("bf16", "openvino"))

    manifest = read_manifest(out)
    assert (manifest.precision, manifest.target, manifest.backend) == ("bf16", "openvino", "openvino")
    assert manifest.export.quantization.attention["mode"] == "standard"
    graph_files = ["vision.onnx", "decoder.onnx", STAND_IN]
    assert set(graph_files) <= set(result.linked)
    for name in graph_files:
        ours, theirs = os.stat(out / name), os.stat(parent / name)
        assert ours.st_ino == theirs.st_ino and ours.st_nlink == 2  # one file on disk, two names
    stand_in = os.stat(out / STAND_IN)
    assert stand_in.st_size == STAND_IN_BYTES and stand_in.st_blocks * 512 < STAND_IN_BYTES  # nothing written
    report = json.loads((out / "fidelity.json").read_text())
    assert report["gate"]["passed"] and report["cpu"]["openvino_capabilities"] and "flags" in report["cpu"]
    assert manifest.fidelity["cpu"] == report["cpu"]
    assert manifest.lineage.parent_precision == "fp32"
    with Embedder.load(out) as bf16:
        assert bf16.backend_name == "openvino"


def test_bf16_is_derived_from_fp32_only(fp32_bundle, tmp_path, monkeypatch):
    from pue.calibration.runtime_precision import derive_runtime_precision
    from pue.errors import PueError

    parent = tmp_path / "fp16-like"
    shutil.copytree(fp32_bundle("llava_next", "ci"), parent)
    manifest = read_manifest(parent)
    manifest.precision = "fp16"
    write_manifest(parent, manifest)
    with pytest.raises(PueError, match="derived from an fp32 bundle"):
        derive_runtime_precision(parent, tmp_path / "out", lookup("bf16", "openvino"))
    assert not (tmp_path / "out").exists()
