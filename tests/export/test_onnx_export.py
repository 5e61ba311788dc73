"""`pue-export onnx`: both exporters, both architectures, the parity gate, external data, tile sizes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from pue.bundle import read_manifest, verify_files
from pue.errors import GateFailedError
from pue.export.onnx_bundle import export_onnx_bundle

# gate_images[-3:-1]: the last H&E tile and the first IHC tile, the gate's minimum of 2 on both stains


def gate_checks(bundle) -> dict[tuple[str, str], dict]:
    manifest = read_manifest(bundle)
    gate = manifest.fidelity["parity_gate"]
    assert gate["passed"]
    return {(c["name"], c["metric"]): c for c in gate["checks"]}


@pytest.mark.parametrize(
    ("arch", "preset", "exporter"),
    [
        ("llava_next", "ci", "torchscript"),
        ("llava_next", "ci", "dynamo"),
        ("llava", "ci", "torchscript"),  # dynamo on llava_next only: the exporter, not the architecture, differs
        ("llava_next", "e5v", "torchscript"),
    ],
)
def test_export_passes_parity_gate(fp32_bundle, arch, preset, exporter):
    bundle = fp32_bundle(arch, preset, exporter)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    checks = gate_checks(bundle)
    for kind in ("images", "texts", "composed"):
        assert checks[(kind, "min cosine")]["value"] >= 0.9999
        assert checks[(kind, "max abs diff")]["value"] <= 1e-4
    assert checks[("vision features", "max abs diff")]["value"] <= 1e-5
    assert manifest.architecture == arch
    assert manifest.precision == "fp32"
    assert manifest.export.exporter == exporter
    expected_tokens = {("llava_next", "ci"): 528, ("llava_next", "e5v"): 1176, ("llava", "ci"): 256}[(arch, preset)]
    assert manifest.tokens_per_image == expected_tokens
    vision = onnx.load(str(bundle / "vision.onnx"), load_external_data=False)
    decoder = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    assert [i.name for i in vision.graph.input] == ["pixel_values"]
    assert [o.name for o in vision.graph.output] == ["image_features"]
    assert [i.name for i in decoder.graph.input] == ["input_ids", "attention_mask", "image_features"]
    assert [o.name for o in decoder.graph.output] == ["sentence_embedding"]
    # batch and sequence are dynamic, with the contract's names
    dims = [d.dim_param for d in decoder.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    # root graphs use only standard ONNX ops (TensorRT must parse them)
    for graph in (vision, decoder):
        assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}


def test_external_data_when_forced(tiny_checkpoint, gate_images, tmp_path):
    out = tmp_path / "bundle"
    result = export_onnx_bundle(
        tiny_checkpoint("llava_next", "ci"), out, external_data_threshold=1, heldout=gate_images[-3:-1]
    )
    assert result.gate.passed
    manifest = read_manifest(out)
    for graph in manifest.graphs.values():
        assert [e.path for e in graph.external_data] == [f"{graph.file.path}.data"]
        assert (out / f"{graph.file.path}.data").stat().st_size > 0.9 * graph.external_data[0].size
    # the weights live in the .data file, the graph file keeps structure and small constants
    assert (out / "decoder.onnx").stat().st_size < 0.25 * (out / "decoder.onnx.data").stat().st_size


def test_other_tile_size(tiny_checkpoint, gate_images, tmp_path):
    out = tmp_path / "bundle-512"
    result = export_onnx_bundle(tiny_checkpoint("llava_next", "e5v"), out, tile_size=512, heldout=gate_images[-3:-1])
    assert result.gate.passed
    manifest = read_manifest(out)
    assert manifest.tile_size == 512
    assert manifest.preprocessing.num_crops == 5
    assert manifest.tokens_per_image == 2928


def test_crop_swap_fails_the_vision_check(tiny_checkpoint, gate_images, tmp_path, monkeypatch):
    """A vision graph that packs crops in the wrong order must fail, even if embeddings look alike.

    E5-V geometry: in the `ci` geometry (pinpoints [[224, 224]]) both crops of a 224 tile are the same pixels."""
    from pue.export.architectures import llava_next

    original = llava_next.pack_index

    def swapped(model, geometry, tokens_per_crop):
        index = original(model, geometry, tokens_per_crop)
        base = index < tokens_per_crop
        crop1 = (index >= tokens_per_crop) & (index < 2 * tokens_per_crop)
        swapped_index = index.clone()
        # exchange the base crop's tokens with the first grid crop's tokens
        swapped_index[base] = index[base] + tokens_per_crop
        swapped_index[crop1] = index[crop1] - tokens_per_crop
        return swapped_index

    monkeypatch.setattr(llava_next, "pack_index", swapped)
    out = tmp_path / "swapped"
    with pytest.raises(GateFailedError) as failure:
        export_onnx_bundle(tiny_checkpoint("llava_next", "e5v"), out, heldout=gate_images[-3:-1])
    assert not out.exists()
    report = json.loads((tmp_path / "swapped.gate-failed.json").read_text())
    failed = {c["name"] for c in report["gate"]["checks"] if not c["passed"]}
    assert "vision features" in failed
    assert failure.value.exit_code == 3


def test_interrupted_export_leaves_nothing(tiny_checkpoint, gate_images, tmp_path, monkeypatch):
    from pue.export import onnx_bundle

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_bundle, "export_graph", interrupted)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        export_onnx_bundle(tiny_checkpoint("llava_next", "ci"), out, heldout=gate_images[:2])
    assert list(tmp_path.iterdir()) == []


def test_bundle_records_reference_identity(fp32_bundle, tiny_checkpoint):
    from pue.export.checkpoint import checkpoint_sha256, inspect_checkpoint

    manifest = read_manifest(fp32_bundle("llava_next", "ci", "torchscript"))
    assert manifest.source_checkpoint.sha256 == checkpoint_sha256(inspect_checkpoint(tiny_checkpoint()))
    assert manifest.prompts.image.count(manifest.prompts.image_placeholder) == 1
    assert "{text}" in manifest.prompts.text and "{text}" in manifest.prompts.composed
    assert manifest.versions["torch"] and manifest.versions["onnxruntime"]
    assert np.isclose(manifest.fidelity["parity_gate"]["details"]["images"]["mean_cosine"], 1.0, atol=1e-5)
