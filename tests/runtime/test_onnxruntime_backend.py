"""The onnxruntime backend on tiny hand-built graphs: input checks, timing, row placement, provider checks."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pue.bundle import (
    GraphSpec,
    ImagePreprocessing,
    Manifest,
    Prompts,
    SourceCheckpoint,
    TensorSpec,
    TokenizerInfo,
    file_entry,
)
from pue.errors import BundleError, MissingDependencyError, ProviderError, PueError
from pue.runtime.backends import Device, OnnxRuntimeBackend, OnnxRuntimeRunner, parse_device
from pue.runtime.backends.base import place_image_features
from pue.runtime.backends.onnxruntime import (
    INT8_ON_CUDA_ADVICE,
    SESSION_CONFIG,
    providers_for,
)
from pue.runtime.cpu import physical_core_count

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

CROPS, SIDE = 2, 4
TOKENS, HIDDEN, DIM, VOCAB = 3, 4, 5, 16
IMAGE_TOKEN_ID, PAD_ID = 7, 0

rng = np.random.default_rng(0)
VISION_WEIGHT = rng.standard_normal((CROPS * 3 * SIDE * SIDE, TOKENS * HIDDEN)).astype(np.float32)
EMBEDDINGS = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
PROJECTION = rng.standard_normal((HIDDEN, DIM)).astype(np.float32)


def vision_graph():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Reshape", ["pixel_values", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weight"], ["mixed"]),
        helper.make_node("Reshape", ["mixed", "features_shape"], ["image_features"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([0, TOKENS, HIDDEN], dtype=np.int64), "features_shape"),
        numpy_helper.from_array(VISION_WEIGHT, "weight"),
    ]
    graph = helper.make_graph(
        nodes,
        "vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", CROPS, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", TOKENS, HIDDEN])],
        initializers,
    )
    return _model(graph)


def decoder_graph():
    """sentence_embedding = (sum of masked token embeddings + sum of image_features over tokens) @ projection."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["token_embeddings"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", ["token_embeddings", "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_1"], ["text_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["image_features", "axis_1"], ["image_sum"], keepdims=0),
        helper.make_node("Add", ["text_sum", "image_sum"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "projection"], ["sentence_embedding"]),
    ]
    initializers = [
        numpy_helper.from_array(EMBEDDINGS, "embeddings"),
        numpy_helper.from_array(PROJECTION, "projection"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", "image_tokens", HIDDEN]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", DIM])],
        initializers,
    )
    return _model(graph)


def _model(graph):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def numpy_vision(pixel_values):
    return (pixel_values.reshape(len(pixel_values), -1) @ VISION_WEIGHT).reshape(-1, TOKENS, HIDDEN)


def numpy_decoder(input_ids, attention_mask, image_features):
    text = (EMBEDDINGS[input_ids] * attention_mask[..., None]).sum(axis=1)
    return (text + image_features.sum(axis=1)) @ PROJECTION


def make_manifest(directory, precision="fp32", target="onnxruntime", external_decoder=False) -> Manifest:
    onnx.save_model(vision_graph(), directory / "vision.onnx")
    if external_decoder:
        onnx.save_model(
            decoder_graph(),
            directory / "decoder.onnx",
            save_as_external_data=True,
            location="decoder.onnx.data",
            size_threshold=64,  # only the weights: onnxruntime needs axes constants inline
        )
    else:
        onnx.save_model(decoder_graph(), directory / "decoder.onnx")
    (directory / "tokenizer.json").write_text("{}")
    external = [file_entry(directory, "decoder.onnx.data")] if external_decoder else []
    return Manifest(
        architecture="tiny",
        precision=precision,
        target=target,
        backend="onnxruntime",
        graphs={
            "vision": GraphSpec(
                file=file_entry(directory, "vision.onnx"),
                inputs=[TensorSpec("pixel_values", "float32", ["batch", CROPS, 3, SIDE, SIDE])],
                outputs=[TensorSpec("image_features", "float32", ["batch", TOKENS, HIDDEN])],
            ),
            "decoder": GraphSpec(
                file=file_entry(directory, "decoder.onnx"),
                inputs=[
                    TensorSpec("input_ids", "int64", ["batch", "seq"]),
                    TensorSpec("attention_mask", "int64", ["batch", "seq"]),
                    TensorSpec("image_features", "float32", ["batch", "image_tokens", HIDDEN]),
                ],
                outputs=[TensorSpec("sentence_embedding", "float32", ["batch", DIM])],
                external_data=external,
            ),
        },
        tile_size=SIDE,
        preprocessing=ImagePreprocessing("anyres", SIDE, SIDE, CROPS, [0.5] * 3, [0.5] * 3, 1 / 255, 3),
        recipe={"name": "e5v"},
        prompts=Prompts("<image>\n", "{text}\n", "<image>{text}\n", "<image>"),
        pooling="last_token",
        tokenizer=TokenizerInfo(file=file_entry(directory, "tokenizer.json"), pad_token_id=PAD_ID),
        image_token_id=IMAGE_TOKEN_ID,
        tokens_per_image=TOKENS,
        embedding_dim=DIM,
        hidden_size=HIDDEN,
        max_seq_len=32,
        default_batch_size=4,
        source_checkpoint=SourceCheckpoint("tiny", "0" * 64, "llava_next"),
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bundle")
    return directory, make_manifest(directory)


@pytest.fixture
def backend(bundle):
    directory, manifest = bundle
    with OnnxRuntimeBackend(directory, manifest, device="cpu", threads=1) as backend:
        yield backend


def make_batch(image_rows, batch=4, seq=8, seed=1):
    """Image rows: TOKENS image ids then text ids; text rows: text ids only, right-padded."""
    generator = np.random.default_rng(seed)
    input_ids = np.full((batch, seq), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((batch, seq), dtype=np.int64)
    for row in range(batch):
        length = int(generator.integers(TOKENS + 1, seq + 1))
        ids = generator.choice([i for i in range(1, VOCAB) if i != IMAGE_TOKEN_ID], size=length)
        if row in image_rows:
            ids[:TOKENS] = IMAGE_TOKEN_ID
        input_ids[row, :length] = ids
        attention_mask[row, :length] = 1
    pixel_values = generator.standard_normal((len(image_rows), CROPS, 3, SIDE, SIDE)).astype(np.float32)
    return input_ids, attention_mask, (pixel_values if len(image_rows) else None), np.array(image_rows, dtype=np.int64)


def expected_embeddings(input_ids, attention_mask, pixel_values, image_rows):
    features = np.zeros((len(input_ids), TOKENS, HIDDEN), dtype=np.float32)
    if len(image_rows):
        features[image_rows] = numpy_vision(pixel_values)
    return numpy_decoder(input_ids, attention_mask, features)


# Devices and providers


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
