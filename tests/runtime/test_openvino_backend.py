"""The OpenVINO backend on tiny hand-built graphs: results, precision set from the manifest and read back, the compile
cache outside the bundle, refusals (bf16 without bf16, fused attention, CUDA), no telemetry."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from fake_bundle import expected_embeddings, make_batch, make_manifest

from pue.bundle import QuantizationInfo, manifest_sha256, write_manifest
from pue.errors import MissingDependencyError, PueError
from pue.precisions import bundle_spec
from pue.runtime.backends import openvino as ov_backend
from pue.runtime.backends.openvino import OpenVinoBackend, cache_dir_for, compile_config, cpu_bf16_support
from pue.runtime.backends.registry import choose

openvino = pytest.importorskip("openvino")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bundle")
    manifest = make_manifest(directory)
    write_manifest(directory, manifest)
    return directory, manifest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(ov_backend.CACHE_ENV, str(tmp_path / "ov-cache"))
    return tmp_path / "ov-cache"


def test_mixed_batch_matches_numpy_and_times_each_stage(bundle, cache):
    directory, manifest = bundle
    input_ids, attention_mask, pixel_values, image_rows = make_batch([0, 2])
    with OpenVinoBackend(directory, manifest, threads=1) as backend:
        got = backend.run(input_ids, attention_mask, pixel_values, image_rows)
        times = backend.stage_times()
    np.testing.assert_allclose(got, expected_embeddings(input_ids, attention_mask, pixel_values, image_rows), rtol=1e-5)
    assert times["vision"] > 0 and times["decoder"] > 0


def test_precision_is_set_from_the_manifest_and_read_back(bundle, cache):
    directory, manifest = bundle
    with OpenVinoBackend(directory, manifest, threads=1) as backend:
        assert backend.config["INFERENCE_PRECISION_HINT"] == "f32"
        assert backend.config["INFERENCE_NUM_THREADS"] == "1"
        for runner in (backend.vision, backend.decoder):
            assert runner.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
            assert int(runner.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    # every precision entry names its compute type: fp16 and INT8 graphs compute the float parts in f32, bf16 in bf16
    assert compile_config(bundle_spec("fp16", "any"), 2, None)["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config(bundle_spec("int8", "tensorrt"), 2, None)["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config(bundle_spec("bf16", "openvino"), 2, None)["INFERENCE_PRECISION_HINT"] == "bf16"
    with pytest.raises(PueError, match="threads must be a positive integer"):
        compile_config(bundle_spec("fp32", "any"), 0, None)


def test_a_compiled_precision_other_than_the_asked_one_is_refused(bundle, cache, monkeypatch):
    """On a CPU without bf16, OpenVINO compiles a bf16 request in f32 without a word: the read-back catches it even
    when the capability check before it is fooled."""
    directory, manifest = bundle
    if cpu_bf16_support():
        pytest.skip("this CPU has bf16: OpenVINO honours the request")
    monkeypatch.setitem(ov_backend.INFERENCE_TYPES, "float32", "bf16")  # ask for bf16 on an fp32 bundle
    monkeypatch.setattr(ov_backend, "cpu_bf16_support", lambda core=None: True)
    with pytest.raises(PueError, match="OpenVINO compiled in f32, the bundle asks for bf16"):
        OpenVinoBackend(directory, manifest, threads=1)


def test_compile_cache_lives_outside_the_bundle_keyed_by_the_manifest_hash(bundle, cache, tmp_path):
    directory, manifest = bundle
    before = sorted(p.name for p in directory.iterdir())
    with OpenVinoBackend(directory, manifest, threads=1) as backend:
        assert backend.cache_dir == cache / manifest_sha256(directory)
    assert any(backend.cache_dir.glob("*.blob"))
    assert sorted(p.name for p in directory.iterdir()) == before  # nothing written into the bundle
    with OpenVinoBackend(directory, manifest, threads=1, cache_dir=tmp_path / "own") as backend:
        assert backend.cache_dir == tmp_path / "own" / manifest_sha256(directory)
    assert cache_dir_for(directory, False) is None
    with OpenVinoBackend(directory, manifest, threads=1, cache_dir=False) as backend:
        assert "CACHE_DIR" not in backend.config


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(ov_backend.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ov_backend.default_cache_dir() == tmp_path / "pue" / "openvino"


def test_runner_checks_feeds_before_dispatch(bundle, cache):
    directory, manifest = bundle
    with OpenVinoBackend(directory, manifest, threads=1) as backend:
        with pytest.raises(PueError, match="has dtype float64, the graph expects float32"):
            backend.vision.infer({"pixel_values": np.zeros((1, 2, 3, 4, 4))})
        with pytest.raises(PueError, match="dimension 1 is fixed at 2"):
            backend.vision.infer({"pixel_values": np.zeros((1, 3, 3, 4, 4), dtype=np.float32)})
        assert backend.vision.inference_count == 0


def test_perf_counters_list_layers(bundle, cache):
    directory, manifest = bundle
    input_ids, attention_mask, pixel_values, image_rows = make_batch([0])
    with OpenVinoBackend(directory, manifest, threads=1, perf_counters=True) as backend:
        backend.run(input_ids, attention_mask, pixel_values, image_rows)
        layers = backend.profiling_data()
    assert {"vision", "decoder"} == set(layers)
    assert any(layer["node_type"] == "MatMul" or "MatMul" in layer["exec_type"] for layer in layers["decoder"]) or any(
        layer["node_type"] == "FullyConnected" for layer in layers["decoder"]
    )
    assert all(layer["real_time_us"] >= 0 for layer in layers["vision"])
    with OpenVinoBackend(directory, manifest, threads=1) as backend, pytest.raises(PueError, match="counters are off"):
        backend.profiling_data()


def test_bf16_bundle_is_refused_on_a_cpu_without_bf16(bundle, monkeypatch, tmp_path):
    directory, manifest = bundle
    bf16 = make_manifest(tmp_path)
    bf16.precision, bf16.target, bf16.backend = "bf16", "openvino", "openvino"
    monkeypatch.setattr(ov_backend, "cpu_bf16_support", lambda core=None: False)
    with pytest.raises(PueError, match="needs native bf16 in the CPU") as refused:
        OpenVinoBackend(tmp_path, bf16)
    assert "AMX" in refused.value.hint and "fp32 parent" in refused.value.hint


def test_registry_states_what_openvino_runs(bundle, tmp_path):
    directory, manifest = bundle
    assert [spec.name for spec in choose(directory, manifest, "auto", "cpu")][:2] == ["onnxruntime", "openvino"]
    fused = make_manifest(tmp_path)
    fused.precision, fused.target = "int8", "onnxruntime"
    fused.export.quantization = QuantizationInfo(
        "int8", "onnxruntime", "minmax", "u8", "int8", attention={"mode": "fused", "graphs": {}}
    )
    with pytest.raises(PueError, match="does not run fused-attention graphs") as refused:
        choose(tmp_path, fused, "openvino", "cpu")
    assert "com.microsoft" in refused.value.message and "--attention standard" in refused.value.hint
    fused.export.quantization.attention = {"mode": "standard", "graphs": {}}
    assert [spec.name for spec in choose(tmp_path, fused, "openvino", "cpu")] == ["openvino"]
    bf16 = make_manifest(tmp_path)
    bf16.precision, bf16.target, bf16.backend = "bf16", "openvino", "openvino"
    assert [spec.name for spec in choose(tmp_path, bf16, "auto", "cpu")] == ["openvino"]
    with pytest.raises(PueError, match="does not run bf16 bundles|not ONNX graphs"):
        choose(tmp_path, bf16, "onnxruntime", "cpu")
    with pytest.raises(PueError, match="bf16 bundle runs in OpenVINO on a CPU"):
        choose(tmp_path, bf16, "auto", "cuda")
    with pytest.raises(PueError, match="CPU only"):
        choose(directory, manifest, "openvino", "cuda")


def test_missing_openvino_names_the_extra(bundle, monkeypatch):
    directory, manifest = bundle
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependencyError) as missing:
        OpenVinoBackend(directory, manifest)
    assert missing.value.extra == "openvino"


def test_no_telemetry_is_sent(bundle, cache, monkeypatch):
    """openvino's wheel brings openvino-telemetry (used by its conversion tools): loading and running a bundle
    never starts it."""
    telemetry = pytest.importorskip("openvino_telemetry")
    calls = []
    for name in ("init", "send_event", "start_session", "send_error", "send_stack_trace"):
        monkeypatch.setattr(telemetry.Telemetry, name, lambda *args, _name=name, **kwargs: calls.append(_name))
    directory, manifest = bundle
    input_ids, attention_mask, pixel_values, image_rows = make_batch([1])
    with OpenVinoBackend(directory, manifest, threads=1) as backend:
        backend.run(input_ids, attention_mask, pixel_values, image_rows)
    assert calls == []


def test_an_int8_bundle_with_8_bit_weights_is_refused_where_openvino_int8_kernels_saturate(
    cache, monkeypatch, tmp_path
):
    """An OpenVINO INT8 bundle that took 8-bit weights (made on a CPU with VNNI or AMX: the manifest's weights say so)
    is refused where OpenVINO's int8 kernels would saturate on them; its 7-bit sibling is not."""
    import dataclasses

    from pue.errors import BundleError
    from pue.precisions import INT8_WEIGHTS, INT8_WEIGHTS_7BIT

    def int8_bundle(weights: str):
        manifest = make_manifest(tmp_path)
        manifest.precision, manifest.target, manifest.backend = "int8", "openvino", "openvino"
        info = QuantizationInfo("int8", "openvino", "minmax", "uint8", weights)
        manifest = dataclasses.replace(manifest, export=dataclasses.replace(manifest.export, quantization=info))
        write_manifest(tmp_path, manifest)
        return manifest

    monkeypatch.setattr("pue.runtime.backends.cpu_int8.saturating_u8s8", lambda: True)
    with pytest.raises(BundleError, match="saturate") as refused:
        OpenVinoBackend(tmp_path, int8_bundle(INT8_WEIGHTS))
    assert "VNNI" in refused.value.hint and "--no-wide-weights" in refused.value.hint
    with OpenVinoBackend(tmp_path, int8_bundle(INT8_WEIGHTS_7BIT), threads=1) as backend:
        assert backend.run(*make_batch([0])).shape[0] == 4  # 7-bit weights cannot saturate
    monkeypatch.setattr("pue.runtime.backends.cpu_int8.saturating_u8s8", lambda: False)
    with OpenVinoBackend(tmp_path, int8_bundle(INT8_WEIGHTS), threads=1) as backend:
        assert backend.run(*make_batch([0])).shape[0] == 4  # VNNI / AMX / ARM: full range is exact
