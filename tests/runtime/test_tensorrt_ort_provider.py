"""onnxruntime's TensorRT execution provider: an opt-in in front of CUDA, checked like CUDA (no silent fallback)."""

from __future__ import annotations

import pytest

from pue.errors import ProviderError, PueError
from pue.runtime.backends.onnxruntime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    GPU_PROVIDER_ENV,
    TENSORRT_CACHE_ENV,
    TENSORRT_PROVIDER,
    check_providers,
    providers_for,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv(GPU_PROVIDER_ENV, raising=False)
    monkeypatch.delenv(TENSORRT_CACHE_ENV, raising=False)


def test_tensorrt_provider_goes_in_front_of_cuda():
    assert providers_for("cuda:1", "tensorrt") == [
        (TENSORRT_PROVIDER, {"device_id": 1}),
        (CUDA_PROVIDER, {"device_id": 1}),
        CPU_PROVIDER,
    ]
    assert providers_for("cuda", "cuda") == providers_for("cuda") == [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER]


def test_environment_opt_in_and_engine_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(GPU_PROVIDER_ENV, "TensorRT")
    monkeypatch.setenv(TENSORRT_CACHE_ENV, str(tmp_path))
    name, options = providers_for("cuda")[0]
    assert name == TENSORRT_PROVIDER
    assert options == {
        "device_id": 0,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path),
    }
    assert providers_for("cuda", "cuda")[0][0] == CUDA_PROVIDER  # the argument wins over the environment
    assert providers_for("cpu") == [CPU_PROVIDER]  # the environment does not move CPU sessions
    monkeypatch.setenv(GPU_PROVIDER_ENV, "rocm")
    with pytest.raises(PueError, match=r"\$PUE_ORT_GPU_PROVIDER is 'rocm'.*cuda, tensorrt"):
        providers_for("cuda")


def test_tensorrt_provider_on_cpu_is_refused():
    with pytest.raises(PueError, match="TensorRT provider runs on a CUDA GPU"):
        providers_for("cpu", "tensorrt")


def test_a_tensorrt_provider_that_did_not_start_is_an_error():
    asked = [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    available = [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    with pytest.raises(ProviderError) as error:
        check_providers(asked, [CUDA_PROVIDER, CPU_PROVIDER], available)
    assert "could not start its TensorRT provider" in str(error.value)
    assert "libnvinfer" in str(error.value)
    check_providers(asked, asked, available)  # all there: fine


def test_cuda_backend_with_the_tensorrt_provider_fails_loudly_on_a_cpu_build(tmp_path):
    pytest.importorskip("onnxruntime")
    import tiny_bundle

    from pue.bundle import read_manifest
    from pue.runtime.backends.onnxruntime import OnnxRuntimeBackend

    bundle = tiny_bundle.make_tiny_bundle(tmp_path / "bundle")
    import onnxruntime

    if TENSORRT_PROVIDER in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a TensorRT provider")
    with pytest.raises(ProviderError, match=TENSORRT_PROVIDER):
        OnnxRuntimeBackend(bundle, read_manifest(bundle), device="cuda", gpu_provider="tensorrt")
