"""The onnxruntime backend on tests/fake_bundle.py's hand-built graphs: session options, the runner contract (input
checks, timing), row placement, batch checks, external data, lifecycle. Devices and providers:
test_onnxruntime_devices.py; the CPU int8 rules: test_cpu_int8_rules.py."""

from __future__ import annotations

import numpy as np
import pytest
from fake_bundle import (
    CROPS,
    DIM,
    HIDDEN,
    IMAGE_TOKEN_ID,
    SIDE,
    TOKENS,
    expected_embeddings,
    make_batch,
    make_manifest,
    numpy_decoder,
    numpy_vision,
    rng,
)

from pue.bundle import GraphSpec, Manifest, TensorSpec
from pue.errors import BundleError, PueError
from pue.runtime.backends import OnnxRuntimeBackend, OnnxRuntimeRunner
from pue.runtime.backends.base import place_image_features
from pue.runtime.backends.onnxruntime import SESSION_CONFIG
from pue.runtime.cpu import physical_core_count

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bundle")
    return directory, make_manifest(directory)


@pytest.fixture
def backend(bundle):
    directory, manifest = bundle
    with OnnxRuntimeBackend(directory, manifest, device="cpu", threads=1) as backend:
        yield backend


# Session options


def test_session_options(bundle):
    directory, _ = bundle
    runner = OnnxRuntimeRunner(directory / "vision.onnx")
    options = runner.session_options
    assert options.intra_op_num_threads == physical_core_count() >= 1
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert options.enable_cpu_mem_arena
    for key, value in SESSION_CONFIG.items():
        assert options.get_session_config_entry(key) == value
    assert OnnxRuntimeRunner(directory / "vision.onnx", threads=3).session_options.intra_op_num_threads == 3
    with pytest.raises(PueError, match="threads must be a positive integer"):
        OnnxRuntimeRunner(directory / "vision.onnx", threads=0)


# Runner contract


def test_runner_metadata_and_lifecycle(bundle):
    directory, _ = bundle
    runner = OnnxRuntimeRunner(directory / "vision.onnx", name="vision", threads=1)
    with pytest.raises(PueError, match="runner 'vision' is not active"):
        runner.infer({"pixel_values": np.zeros((1, CROPS, 3, SIDE, SIDE), np.float32)})
    with runner:
        assert runner.is_active
        assert runner.input_metadata() == [TensorSpec("pixel_values", "float32", ["batch", CROPS, 3, SIDE, SIDE])]
        assert runner.output_metadata() == [TensorSpec("image_features", "float32", ["batch", TOKENS, HIDDEN])]
        pixel_values = rng.standard_normal((2, CROPS, 3, SIDE, SIDE)).astype(np.float32)
        outputs = runner.infer({"pixel_values": pixel_values})
        np.testing.assert_allclose(outputs["image_features"], numpy_vision(pixel_values), rtol=1e-5, atol=1e-5)
        assert runner.inference_count == 1 and runner.last_inference_time > 0
        assert runner.total_inference_time == runner.last_inference_time
        runner.infer({"pixel_values": pixel_values})
        assert runner.inference_count == 2
        assert runner.total_inference_time == pytest.approx(runner.last_inference_time + outputs_time(runner))
    assert not runner.is_active and runner.session is None


def outputs_time(runner):
    return runner.total_inference_time - runner.last_inference_time


class NeverCalled:
    """Stands in for the session: the input check must refuse before anything is dispatched."""

    def run(self, *args, **kwargs):
        raise AssertionError("dispatched a feed the input check should have refused")


@pytest.mark.parametrize(
    ("feed", "match"),
    [
        ({"input_ids": np.zeros((2, 5), np.int32)}, r"'input_ids' has dtype int32, the graph expects int64"),
        ({"attention_mask": np.zeros((2, 5), np.float32)}, r"'attention_mask' has dtype float32"),
        ({"input_ids": np.zeros((2, 5, 1), np.int64)}, r"'input_ids' has shape \[2, 5, 1\] \(rank 3\).*rank 2"),
        ({"image_features": np.zeros((2, 3, HIDDEN + 1), np.float32)}, r"dimension 2 is fixed at 4"),
        ({"image_features": None}, r"missing \['image_features'\]"),
        ({"extra": np.zeros(1, np.float32)}, r"unexpected \['extra'\]"),
        ({"input_ids": [[1, 2]]}, r"\['input_ids'\] are not numpy arrays"),
    ],
)
def test_runner_refuses_bad_feeds_before_dispatch(bundle, feed, match):
    directory, _ = bundle
    good = {
        "input_ids": np.ones((2, 5), np.int64),
        "attention_mask": np.ones((2, 5), np.int64),
        "image_features": np.zeros((2, 3, HIDDEN), np.float32),
    }
    for name, value in feed.items():
        if value is None:
            del good[name]
        else:
            good[name] = value
    with OnnxRuntimeRunner(directory / "decoder.onnx", name="decoder", threads=1) as runner:
        runner.session = NeverCalled()
        with pytest.raises(PueError, match=rf"decoder: .*{match}|{match}"):
            runner.infer(good)
        assert runner.inference_count == 0


def test_runner_refuses_a_wrong_fixed_crop_count(bundle):
    directory, _ = bundle
    with OnnxRuntimeRunner(directory / "vision.onnx", name="vision", threads=1) as runner:
        with pytest.raises(PueError, match=r"vision: input 'pixel_values' .*dimension 1 is fixed at 2"):
            runner.infer({"pixel_values": np.zeros((1, 3, 3, SIDE, SIDE), np.float32)})


def test_infer_bound_checks_and_times_like_infer(bundle):
    directory, _ = bundle
    pixel_values = rng.standard_normal((3, CROPS, 3, SIDE, SIDE)).astype(np.float32)
    with OnnxRuntimeRunner(directory / "vision.onnx", name="vision", threads=1) as runner:
        on_device = runner.infer_bound({"pixel_values": pixel_values}, device_outputs=["image_features"])
        value = on_device["image_features"]
        assert isinstance(value, onnxruntime.OrtValue) and value.shape() == [3, TOKENS, HIDDEN]
        np.testing.assert_allclose(value.numpy(), numpy_vision(pixel_values), rtol=1e-5, atol=1e-5)
        on_host = runner.infer_bound({"pixel_values": pixel_values})
        assert isinstance(on_host["image_features"], np.ndarray)
        assert runner.inference_count == 2 and runner.last_inference_time > 0
        with pytest.raises(PueError, match="dtype float64"):
            runner.infer_bound({"pixel_values": pixel_values.astype(np.float64)})


# Backend


def test_mixed_batch_places_image_features_on_their_rows(backend):
    batch = make_batch([1, 3])
    embeddings = backend.run(*batch)
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, DIM)
    np.testing.assert_allclose(embeddings, expected_embeddings(*batch), rtol=1e-4, atol=1e-4)
    # Each row equals that row run alone: rows 0 and 2 see zeros, rows 1 and 3 their own image.
    input_ids, attention_mask, pixel_values, _ = batch
    for row, image in [(0, None), (1, 0), (2, None), (3, 1)]:
        single = backend.run(
            input_ids[row : row + 1],
            attention_mask[row : row + 1],
            None if image is None else pixel_values[image : image + 1],
            np.array([] if image is None else [0], dtype=np.int64),
        )
        np.testing.assert_allclose(single[0], embeddings[row], rtol=1e-4, atol=1e-4)
    # Swapping which row carries which image changes exactly those rows.
    swapped = backend.run(input_ids, attention_mask, pixel_values[::-1].copy(), np.array([1, 3]))
    assert not np.allclose(swapped[1], embeddings[1]) and not np.allclose(swapped[3], embeddings[3])
    np.testing.assert_allclose(swapped[[0, 2]], embeddings[[0, 2]], rtol=1e-5, atol=1e-5)


def test_rows_of_several_images_take_their_images_in_order(backend, monkeypatch):
    """Row 1 holds two images, row 3 one: the decoder gets [batch, 2 × TOKENS, HIDDEN], each row's images one after
    another, zeros after a row's last image and on text rows."""
    input_ids, attention_mask, _, _ = make_batch([1, 3], seq=2 * TOKENS + 2)
    input_ids[1, : 2 * TOKENS] = IMAGE_TOKEN_ID
    attention_mask[1, : 2 * TOKENS + 1] = 1
    pixels = np.random.default_rng(3).standard_normal((3, CROPS, 3, SIDE, SIDE)).astype(np.float32)
    fed = []
    real_infer = backend.decoder.infer
    monkeypatch.setattr(backend.decoder, "infer", lambda feed: fed.append(feed["image_features"]) or real_infer(feed))
    embeddings = backend.run(input_ids, attention_mask, pixels, np.array([1, 1, 3]))
    per_image = numpy_vision(pixels)
    features = fed[0]
    assert features.shape == (4, 2 * TOKENS, HIDDEN)
    np.testing.assert_allclose(features[1], np.concatenate([per_image[0], per_image[1]]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features[3, :TOKENS], per_image[2], rtol=1e-5, atol=1e-5)
    assert not features[3, TOKENS:].any() and not features[[0, 2]].any()
    np.testing.assert_allclose(embeddings, numpy_decoder(input_ids, attention_mask, features), rtol=1e-4, atol=1e-4)


def test_place_image_features_by_hand():
    features = np.arange(4 * 2 * 1, dtype=np.float32).reshape(4, 2, 1)  # 4 images of 2 tokens
    placed = place_image_features(features, np.array([0, 0, 0, 2]), batch=3, dtype=np.dtype(np.float32))
    assert placed[..., 0].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0], [6, 7, 0, 0, 0, 0]]


def test_all_text_batch_feeds_one_zero_image_token(backend, monkeypatch):
    fed = []
    real_infer = backend.decoder.infer

    def spy(feed):
        fed.append(feed["image_features"])
        return real_infer(feed)

    monkeypatch.setattr(backend.decoder, "infer", spy)
    vision_calls = backend.vision.inference_count
    batch = make_batch([])
    embeddings = backend.run(*batch)
    assert fed[0].shape == (4, 1, HIDDEN) and fed[0].dtype == np.float32 and not fed[0].any()
    assert backend.vision.inference_count == vision_calls  # vision never ran
    np.testing.assert_allclose(embeddings, expected_embeddings(*batch), rtol=1e-4, atol=1e-4)


def test_all_image_batch_through_io_binding_matches_host_path(bundle):
    directory, manifest = bundle
    batch = make_batch([0, 1, 2, 3])
    with OnnxRuntimeBackend(directory, manifest, threads=1, use_io_binding=True) as bound:
        on_device = bound.run(*batch)
        assert bound.vision.inference_count == bound.decoder.inference_count == 1
    with OnnxRuntimeBackend(directory, manifest, threads=1) as host:
        assert not host.use_io_binding
        np.testing.assert_allclose(host.run(*batch), on_device, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(on_device, expected_embeddings(*batch), rtol=1e-4, atol=1e-4)


def test_stage_times_accumulate(backend):
    assert backend.stage_times() == {"vision": 0.0, "decoder": 0.0}
    backend.run(*make_batch([0, 2]))
    first = backend.stage_times()
    assert first["vision"] > 0 and first["decoder"] > 0
    assert first["vision"] == backend.vision.last_inference_time
    backend.run(*make_batch([1]))
    second = backend.stage_times()
    assert second["vision"] > first["vision"] and second["decoder"] > first["decoder"]
    assert backend.vision.inference_count == backend.decoder.inference_count == 2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda b: (b[0], b[1], b[2], np.array([3, 1])), r"image_rows \[3, 1\] must be non-decreasing"),
        (lambda b: (b[0], b[1], b[2], np.array([1, 4])), r"must be non-decreasing row indices in \[0, 4\)"),
        (lambda b: (b[0], b[1], b[2][:1], b[3]), "image_rows lists 2 images but pixel_values holds 1"),
        (lambda b: (b[0], b[1], None, b[3]), "image_rows lists 2 images but pixel_values holds none"),
        (lambda b: (b[0], b[1], b[2], np.array([1, 1])), "row 1 holds 3 image tokens, expected 6"),
        (lambda b: (b[0], b[1], b[2], np.array([1, 2])), "row 2 holds 0 image tokens, expected 3"),
        (lambda b: (b[0], b[1][:, :3], b[2], b[3]), "must both be"),
    ],
)
def test_bad_batches_are_refused(backend, change, match):
    with pytest.raises(PueError, match=match):
        backend.run(*change(make_batch([1, 3])))


def test_text_row_with_image_tokens_is_refused(backend):
    input_ids, attention_mask, _, _ = make_batch([])
    input_ids[2, 0] = IMAGE_TOKEN_ID
    with pytest.raises(PueError, match=r"row 2 holds 1 image tokens, expected 0 \(0 images listed in image_rows\)"):
        backend.run(input_ids, attention_mask, None, np.array([], dtype=np.int64))


def test_external_data_graph_loads_from_the_bundle_directory(tmp_path):
    manifest = make_manifest(tmp_path, external_decoder=True)
    assert (tmp_path / "decoder.onnx.data").is_file()
    with OnnxRuntimeBackend(tmp_path, manifest, threads=1) as backend:
        batch = make_batch([0])
        np.testing.assert_allclose(backend.run(*batch), expected_embeddings(*batch), rtol=1e-4, atol=1e-4)


def test_close_deactivates_both_runners(bundle):
    directory, manifest = bundle
    backend = OnnxRuntimeBackend(directory, manifest, threads=1)
    assert backend.vision.is_active and backend.decoder.is_active
    backend.close()
    assert not backend.vision.is_active and not backend.decoder.is_active
    with pytest.raises(PueError, match="not active"):
        backend.run(*make_batch([0]))


def test_missing_or_escaping_graphs_are_bundle_errors(bundle, tmp_path):
    directory, manifest = bundle
    without_vision = Manifest(**{**manifest.__dict__, "graphs": {"decoder": manifest.graphs["decoder"]}})
    with pytest.raises(BundleError, match=r"names no vision graph \(it has \['decoder'\]\)"):
        OnnxRuntimeBackend(directory, without_vision)
    escaping_file = manifest.graphs["vision"].file.__class__("../vision.onnx", "0" * 64, 1)
    escaping = Manifest(
        **{**manifest.__dict__, "graphs": {**manifest.graphs, "vision": GraphSpec(escaping_file, [], [])}}
    )
    with pytest.raises(BundleError, match="leaves the bundle directory"):
        OnnxRuntimeBackend(directory, escaping)
    with pytest.raises(BundleError, match="does not exist"):
        OnnxRuntimeRunner(tmp_path / "absent.onnx").activate()
