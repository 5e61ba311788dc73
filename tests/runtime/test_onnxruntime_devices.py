"""The onnxruntime backend's devices and providers (tests/fake_bundle.py's hand-built bundle): device strings, the
provider list, a missing or silently failing CUDA provider, a missing onnxruntime."""

from __future__ import annotations

import sys

import pytest
from fake_bundle import make_manifest

from pue.errors import MissingDependencyError, ProviderError, PueError
from pue.runtime.backends import Device, OnnxRuntimeBackend, OnnxRuntimeRunner, parse_device
from pue.runtime.backends.onnxruntime import providers_for

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bundle")
    return directory, make_manifest(directory)


@pytest.mark.parametrize(
    ("text", "device"),
    [("cpu", Device("cpu")), ("cuda", Device("cuda", 0)), ("cuda:0", Device("cuda", 0)), ("cuda:3", Device("cuda", 3))],
)
def test_parse_device(text, device):
    assert parse_device(text) == device
    assert str(parse_device(text)) == ("cuda:0" if text == "cuda" else text)


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "cpu:0", " cpu", "", "mps", None, 0])
def test_bad_device_strings_list_the_valid_forms(bad, bundle):
    with pytest.raises(PueError, match=r'unknown device .*"cpu", "cuda" or "cuda:N"'):
        parse_device(bad)
    directory, manifest = bundle
    with pytest.raises(PueError, match="unknown device"):
        OnnxRuntimeBackend(directory, manifest, device=bad)


def test_providers_for_each_device():
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    assert providers_for("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert providers_for("cuda:2") == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="CUDA is available")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_provider_raises_a_helpful_provider_error(bundle, device):
    directory, manifest = bundle
    with pytest.raises(ProviderError) as info:
        OnnxRuntimeBackend(directory, manifest, device=device)
    message = str(info.value)
    assert "asked onnxruntime for ['CUDAExecutionProvider', 'CPUExecutionProvider']" in message
    assert "the session got ['CPUExecutionProvider']" in message
    assert f"get_available_providers() is {onnxruntime.get_available_providers()}" in message
    assert 'pip install "pue[gpu]"' in message and 'never together with "pue[cpu]"' in message


def test_silent_cuda_fallback_is_caught_after_session_creation(bundle, monkeypatch):
    """onnxruntime-gpu lists CUDA but falls back to CPU when e.g. libcublasLt is missing: refuse loudly."""
    directory, manifest = bundle
    real = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in real:
        pytest.skip("CUDA is available; the fallback cannot be provoked here")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with pytest.raises(ProviderError, match="the session got \\['CPUExecutionProvider'\\]") as info:
        OnnxRuntimeRunner(directory / "vision.onnx", "cuda:0").activate()
    assert "could not start CUDA" in str(info.value) and "libcublasLt" in str(info.value)


@pytest.mark.parametrize(("device", "extra"), [("cpu", "pue[cpu]"), ("cuda", "pue[gpu]")])
def test_missing_onnxruntime_names_the_extra(bundle, monkeypatch, device, extra):
    directory, manifest = bundle
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError) as info:
        OnnxRuntimeBackend(directory, manifest, device=device)
    message = str(info.value)
    assert "'onnxruntime'" in message and f'pip install "{extra}"' in message
    assert "pue[gpu]" in message  # the CPU message also says what to install for CUDA
    with pytest.raises(MissingDependencyError):
        OnnxRuntimeRunner(directory / "vision.onnx")


def test_importing_the_backends_does_not_import_onnxruntime():
    import subprocess

    code = (
        "import sys, pue.runtime.backends, pue.runtime.backends.openvino; "
        "print('onnxruntime' in sys.modules, 'openvino' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"
