"""The CPU int8 rules of the onnxruntime backend (tests/fake_bundle.py's hand-built bundle): a CPU int8 bundle
refused on CUDA, full-range u8×s8 weights refused where int8 kernels saturate (x86 without VNNI), s8 QDQ graphs run
in float there."""

from __future__ import annotations

import sys

import pytest
from fake_bundle import DIM, make_batch, make_manifest

from pue.bundle import Manifest
from pue.errors import BundleError, ProviderError, PueError
from pue.runtime.backends import OnnxRuntimeBackend, parse_device
from pue.runtime.backends.onnxruntime import INT8_ON_CUDA_ADVICE

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cpu_int8_bundle_on_cuda_is_refused_with_advice(tmp_path, precision, device, monkeypatch):
    manifest = make_manifest(tmp_path, precision=precision, target="onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # refused before onnxruntime is even needed
    with pytest.raises(PueError) as info:
        OnnxRuntimeBackend(tmp_path, manifest, device=device)
    assert str(info.value) == INT8_ON_CUDA_ADVICE
    assert "--target tensorrt" in str(info.value) and "pue-export trt" in str(info.value)


def test_int8_bundles_are_not_refused_where_they_belong(tmp_path):
    manifest = make_manifest(tmp_path, precision="int8", target="onnxruntime")
    with OnnxRuntimeBackend(tmp_path, manifest, device="cpu", threads=1) as backend:
        assert backend.run(*make_batch([0])).shape == (4, DIM)
    tensorrt_int8 = make_manifest(tmp_path, precision="int8", target="tensorrt")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ProviderError):  # not the INT8 refusal: it only lacks CUDA here
            OnnxRuntimeBackend(tmp_path, tensorrt_int8, device="cuda")


def quantized(manifest: Manifest, weights: str) -> Manifest:
    import dataclasses

    from pue.bundle import QuantizationInfo

    info = QuantizationInfo(manifest.precision, manifest.target, "minmax", "uint8", weights)
    return dataclasses.replace(manifest, export=dataclasses.replace(manifest.export, quantization=info))


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_full_range_u8s8_bundles_are_refused_where_int8_kernels_saturate(tmp_path, monkeypatch, precision):
    from pue.precisions import INT8_WEIGHTS, INT8_WEIGHTS_7BIT

    manifest = make_manifest(tmp_path, precision=precision, target="onnxruntime")
    monkeypatch.setattr("pue.runtime.backends.cpu_int8.saturating_u8s8", lambda: True)
    with pytest.raises(BundleError, match="saturate") as info:
        OnnxRuntimeBackend(tmp_path, quantized(manifest, INT8_WEIGHTS), device="cpu", threads=1)
    assert "re-quantize" in str(info.value) and "VNNI" in str(info.value)
    with OnnxRuntimeBackend(tmp_path, quantized(manifest, INT8_WEIGHTS_7BIT), device="cpu", threads=1) as backend:
        assert backend.run(*make_batch([0])).shape == (4, DIM)  # 7-bit weights cannot saturate
    monkeypatch.setattr("pue.runtime.backends.cpu_int8.saturating_u8s8", lambda: False)
    with OnnxRuntimeBackend(tmp_path, quantized(manifest, INT8_WEIGHTS), device="cpu", threads=1) as backend:
        assert backend.run(*make_batch([0])).shape == (4, DIM)  # VNNI / AMX / ARM: full range is fine


def test_saturation_is_a_property_of_x86_without_vnni(monkeypatch):
    from pue.runtime import cpu

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert cpu.saturating_u8s8()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert not cpu.saturating_u8s8()
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"asimd"}))
    assert not cpu.saturating_u8s8()


def test_s8_qdq_graphs_run_in_float_where_int8_kernels_saturate(tmp_path, monkeypatch, caplog):
    from pue.runtime.backends.cpu_int8 import QDQ_IN_FLOAT, s8_qdq_in_float

    tensorrt_int8 = make_manifest(tmp_path, precision="int8", target="tensorrt")
    onnxruntime_int8 = make_manifest(tmp_path, precision="int8", target="onnxruntime")
    monkeypatch.setattr("pue.runtime.backends.cpu_int8.saturating_u8s8", lambda: True)
    with caplog.at_level("WARNING"):
        assert s8_qdq_in_float(tensorrt_int8, parse_device("cpu")) == QDQ_IN_FLOAT
    assert "run in float" in caplog.text  # said, never silent
    assert s8_qdq_in_float(onnxruntime_int8, parse_device("cpu")) == {}  # 7-bit u8×s8: the int8 kernels are exact
    assert s8_qdq_in_float(tensorrt_int8, parse_device("cuda")) == {}
    monkeypatch.setattr("pue.runtime.backends.cpu_int8.saturating_u8s8", lambda: False)
    assert s8_qdq_in_float(tensorrt_int8, parse_device("cpu")) == {}
