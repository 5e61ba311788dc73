"""The precision table: every entry's targets, devices, Q/DQ flavour and backends; refusals at the edge; the typed
`export` record of a manifest (old dicts still read)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from pue.bundle import EngineBuildInfo, ExportInfo, Manifest, QuantizationInfo
from pue.choices import Attention, BundleTarget, DeviceKind, Precision, QuantizePrecision, Target
from pue.errors import BundleError, PueError
from pue.precisions import (
    CPU_INT8_ADVICE,
    PRECISION_TABLE,
    ActivationScheme,
    PrecisionKind,
    bundle_spec,
    engine_precisions,
    engine_source_for,
    lookup,
    precision_spec,
    quantize_spec,
    quantized_precisions,
)
from pue.runtime.backends.registry import capable

CPU, CUDA = DeviceKind.CPU, DeviceKind.CUDA

# precision, target -> (activation scheme, devices, attention layouts, engine source, backends on cpu, on cuda)
# (the bundles here record no quantization, so their attention is standard: OpenVINO runs them all on CPU)
ONNX_CPU = ["onnxruntime", "openvino"]
EXPECTED = {
    ("fp32", "any"): (None, (CPU, CUDA), ("standard",), True, ONNX_CPU, ["onnxruntime"]),
    ("fp16", "any"): (None, (CPU, CUDA), ("standard",), True, ONNX_CPU, ["onnxruntime"]),
    ("int8", "onnxruntime"): ("u8", (CPU,), ("fused", "standard"), False, ONNX_CPU, None),
    ("int8", "tensorrt"): ("s8", (CPU, CUDA), ("standard",), True, ONNX_CPU, ["onnxruntime"]),
    ("int8-dynamic", "onnxruntime"): ("dynamic", (CPU,), ("fused", "standard"), False, ONNX_CPU, None),
    ("bf16", "openvino"): (None, (CPU,), ("standard",), False, ["openvino"], None),
    ("int8", "openvino"): ("u8", (CPU,), ("standard",), False, ["openvino"], None),
    ("int8-bf16", "openvino"): ("u8", (CPU,), ("standard",), False, ["openvino"], None),
    ("int8-dynamic", "openvino"): ("grouped", (CPU,), ("standard",), False, ["openvino"], None),
    ("int8-dynamic-bf16", "openvino"): ("grouped", (CPU,), ("standard",), False, ["openvino"], None),
}
# the manifest `backend` of each: runtime precisions name the backend that honours them
# and the OpenVINO-target Q/DQ bundles, whose gate measured OpenVINO's int8 kernels
BUNDLE_BACKEND = {target: "openvino" for target in EXPECTED if target[1] == "openvino"}


def test_the_table_holds_one_entry_per_precision_and_target_and_agrees_with_the_enums():
    keys = [(str(spec.precision), str(spec.target)) for spec in PRECISION_TABLE]
    assert sorted(keys) == sorted(EXPECTED) and len(set(keys)) == len(keys)
    assert {spec.precision for spec in PRECISION_TABLE} == set(Precision)
    assert {spec.target for spec in PRECISION_TABLE} | {BundleTarget.ANY} == set(BundleTarget)
    assert set(Target.values()) <= set(BundleTarget.values())
    assert set(quantized_precisions()) == set(QuantizePrecision.values())  # what `pue-export quantize` offers
    runtime = [(str(s.precision), str(s.target)) for s in PRECISION_TABLE if s.kind is PrecisionKind.RUNTIME]
    assert runtime == [("bf16", "openvino")]  # set on the backend at inference, not written into the graphs
    assert lookup("bf16", "openvino").compute == "bfloat16"
    weight_compute = {str(s.precision): s.compute for s in PRECISION_TABLE if s.kind is PrecisionKind.WEIGHT}
    mixed = {p: c for p, c in weight_compute.items() if c != "float32"}  # int8 + bf16
    assert mixed == {"int8-bf16": "bfloat16", "int8-dynamic-bf16": "bfloat16"}
    assert all(lookup(*key).backend == backend for key, backend in BUNDLE_BACKEND.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRECISION_TABLE[0].devices = ()  # type: ignore[misc]


@pytest.mark.parametrize(("precision", "target"), sorted(EXPECTED))
def test_each_entry(precision, target):
    scheme, devices, attention, engine_source, on_cpu, on_cuda = EXPECTED[(precision, target)]
    spec = lookup(precision, target)
    assert spec is not None and precision_spec(precision, target) is spec
    assert (spec.qdq.scheme if spec.qdq else None) == scheme
    assert spec.devices == devices and tuple(spec.attention) == attention and spec.default_attention == attention[0]
    assert spec.engine_source is engine_source
    assert spec.calibrated is (scheme in ("u8", "s8"))  # --calibration-method applies to static scales only
    assert spec.calibration_data is (precision not in ("fp32", "bf16"))
    assert (spec.parent == "fp32") is (precision != "fp32")
    backend = BUNDLE_BACKEND.get((precision, target), "onnxruntime")
    bundle = SimpleNamespace(backend=backend, precision=precision, target=target, export=ExportInfo())
    assert [b.name for b in capable("b", bundle, "cpu")] == on_cpu
    if on_cuda is None:
        assert not spec.runs_on("cuda:1")
        with pytest.raises(PueError) as refused:
            spec.check_device("cuda")
        onnxruntime_int8 = precision.startswith("int8") and target == "onnxruntime"
        assert str(refused.value) == (CPU_INT8_ADVICE if onnxruntime_int8 else spec.device_advice)
    else:
        assert [b.name for b in capable("b", bundle, "cuda:0")] == on_cuda
    if engine_source:  # the engines pue-export trt builds from it run on TensorRT, on CUDA only
        engines = SimpleNamespace(backend="tensorrt", precision=precision, target="tensorrt", export=ExportInfo())
        assert [b.name for b in capable("e", engines, "cuda")] == ["tensorrt"]
        assert capable("e", engines, "cpu") == []


def test_the_qdq_flavours_match_what_each_target_runs_fast():
    ort, trt = lookup("int8", "onnxruntime").qdq, lookup("int8", "tensorrt").qdq
    assert (ort.activation_type, ort.symmetric, ort.static, ort.dedicated_pairs) == ("uint8", False, True, False)
    assert (trt.activation_type, trt.symmetric, trt.static, trt.dedicated_pairs) == ("int8", True, True, True)
    dynamic = lookup("int8-dynamic", "onnxruntime").qdq
    assert dynamic.scheme is ActivationScheme.DYNAMIC and not dynamic.static
    assert lookup("int8", "onnxruntime").activations == "uint8 asymmetric per-tensor"  # as manifests record it
    assert lookup("fp16", "any").qdq is None and lookup("fp16", "any").activations == "float16"


def test_a_request_resolves_to_the_graphs_made_for_it():
    assert precision_spec("fp16", "onnxruntime") is lookup("fp16", "any")  # FP16 graphs serve any target
    assert precision_spec(Precision.FP32, Target.TENSORRT) is lookup("fp32", "any")
    assert quantize_spec("fp16", "tensorrt").target == BundleTarget.ANY
    assert quantize_spec("int8", "tensorrt").attention == (Attention.STANDARD,)
    assert lookup("fp16", "onnxruntime") is None  # exact lookups do not fall back


def test_unknown_and_mismatched_choices_are_refused_at_the_edge():
    with pytest.raises(PueError, match="unknown precision 'int4'.*fp32, fp16, int8, int8-dynamic"):
        precision_spec("int4", "any")
    with pytest.raises(PueError, match="unknown target 'coreml'"):
        precision_spec("fp32", "coreml")
    with pytest.raises(PueError) as mismatched:
        precision_spec("int8-dynamic", "tensorrt")
    assert mismatched.value.message == "int8-dynamic is for onnxruntime or OpenVINO on CPU only"
    assert mismatched.value.hint == "for TensorRT use --precision int8 --target tensorrt"
    with pytest.raises(PueError, match="int8 is for onnxruntime or TensorRT or OpenVINO only"):
        precision_spec("int8", "any")
    with pytest.raises(PueError, match="unknown precision 'fp32'"):
        quantize_spec("fp32", "onnxruntime")  # a precision, but not one `pue-export quantize` makes
    with pytest.raises(PueError, match="unknown target 'any'"):
        quantize_spec("fp16", "any")  # a manifest's target, not a --target
    with pytest.raises(BundleError, match="names precision 'fp8'.*install the pue that did"):
        bundle_spec("fp8", "any")
    with pytest.raises(BundleError, match="bf16 is for OpenVINO on CPU only"):
        bundle_spec("bf16", "tensorrt")


def test_engine_sources():
    assert engine_precisions() == ("fp32", "fp16", "int8")
    assert engine_source_for("int8-dynamic") is lookup("int8", "tensorrt")
    assert engine_source_for("fp16") is lookup("fp16", "any")
    assert engine_source_for("fp8") is None


# --- the manifest's typed `export` -------------------------------------------------------------------------
ROOT_EXPORT = {
    "exporter": "torchscript",
    "opset": 17,
    "dtype": "float32",
    "num_crops": 5,
    "crop_size": 56,
    "patch_size": 14,
    "attention": {"vision": {"kind": "encoder", "heads": 4, "head_dim": 16}},
    "decoder_last_layer": "pooled row",
    "timings": {"export_s": 1.5},
}


def test_export_round_trips_and_keeps_what_it_does_not_know():
    export = ExportInfo.from_dict({**ROOT_EXPORT, "future_key": [1, 2]})
    assert export.patch_size == 14 and export.attention["vision"]["heads"] == 4 and export.quantization is None
    assert export.extra == {"future_key": [1, 2]}
    assert export.to_dict() == {**ROOT_EXPORT, "future_key": [1, 2]}
    assert list(export.to_dict()) == [*ROOT_EXPORT, "future_key"]  # the order manifests were written in
    assert ExportInfo().to_dict() == {}  # nothing recorded, nothing written (no nulls)


def test_quantized_and_engine_exports_are_typed():
    quantization = {
        "precision": "int8",
        "target": "tensorrt",
        "method": "minmax",
        "activations": "int8 symmetric per-tensor",
        "weights": "int8 symmetric per-channel",
        "attention": {"mode": "standard", "graphs": {}},
        "pue": "0.1.0",
    }
    export = ExportInfo.from_dict({**ROOT_EXPORT, "quantization": quantization})
    assert isinstance(export.quantization, QuantizationInfo) and export.quantization.weights.startswith("int8")
    assert json.loads(json.dumps(export.to_dict()))["quantization"] == quantization
    build = {"parent_bundle": "/b", "batch": "1:8:32", "max_seq": 128, "rebuild_command": "pue-export trt /b -o /e"}
    # engine bundles written before the typed record nested their parent's export under "parent_export"
    parent = {**ROOT_EXPORT, "quantization": quantization}
    old_engine = ExportInfo.from_dict({"parent_export": parent, "tensorrt": build})
    assert isinstance(old_engine.tensorrt, EngineBuildInfo) and old_engine.tensorrt.max_seq == 128
    assert old_engine.patch_size == 14 and old_engine.quantization.target == "tensorrt"
    assert "parent_export" not in old_engine.to_dict() and old_engine.to_dict()["tensorrt"]["batch"] == "1:8:32"


def test_a_manifest_given_a_free_export_dict_types_it(tmp_path):
    import tiny_bundle

    from pue.bundle import read_manifest, write_manifest

    bundle = tiny_bundle.make_tiny_bundle(tmp_path / "b")
    manifest = read_manifest(bundle)
    assert isinstance(manifest.export, ExportInfo)
    data = manifest.to_dict()
    data["export"] = ROOT_EXPORT  # what every 1.0 / 1.1 root bundle holds
    typed = Manifest.from_dict(data)
    assert typed.export.patch_size == 14 and typed.to_dict()["export"] == ROOT_EXPORT
    assert Manifest(**{**vars(typed), "export": dict(ROOT_EXPORT)}).export.crop_size == 56
    write_manifest(bundle, typed)
    assert json.loads((bundle / "manifest.json").read_text())["export"] == ROOT_EXPORT


def test_no_magic_default_patch_size(tmp_path):
    import tiny_bundle

    from pue.bundle import read_manifest
    from pue.calibration.quantize_plan import vision_tokens

    manifest = read_manifest(tiny_bundle.make_tiny_bundle(tmp_path / "b"))
    manifest.export = ExportInfo(patch_size=8)
    crops, side = manifest.preprocessing.num_crops, manifest.preprocessing.crop_size
    assert vision_tokens(manifest) == crops * (side // 8) ** 2
    manifest.export = ExportInfo()
    with pytest.raises(BundleError, match="does not record the vision patch size"):
        vision_tokens(manifest)
