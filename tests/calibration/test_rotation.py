"""Rotating the decoder's residual stream (issue 14, item 2): the orthogonal matrices, each fold on a small graph
built by hand (gains into readers, Qᵀ·W, W·Q, biases, the embedding table, image_features, the undo before the
final norm), refusals, and the FP32 function unchanged on exported tiny decoders."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_graphs import float_input, initializer, make_model, node_by_name, run

from pue.calibration.graph_ops import weight_ops
from pue.calibration.outliers import collect_outliers
from pue.calibration.rotation import (
    RotationError,
    find_rms_norms,
    hadamard,
    orthogonal_matrix,
    rotate_decoder,
    rotation_cosine,
)

VOCAB, INNER, SEQ = 11, 5, 4


@pytest.mark.parametrize("width", [1, 2, 8, 64, 6, 48, 384])
def test_orthogonal_matrix_is_orthogonal_and_seeded(width):
    q, kind = orthogonal_matrix(width, seed=3)
    assert np.allclose(q @ q.T, np.eye(width), atol=1e-12)
    assert np.array_equal(q, orthogonal_matrix(width, seed=3)[0])
    if width & (width - 1) == 0:
        assert kind == "randomized-hadamard"
        assert np.allclose(np.abs(q), 1 / np.sqrt(width))  # every channel spread evenly over all channels
    else:
        assert kind == "random-orthogonal"
        assert not np.array_equal(q, orthogonal_matrix(width, seed=4)[0])


def test_hadamard_is_sylvester_and_refuses_other_widths():
    h = hadamard(4)
    assert np.array_equal(h, [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


def _rms_norm(prefix: str, x: str, gain: str) -> tuple[list[onnx.NodeProto], str]:
    """x · 1/√(mean(x²)+ε) · g, as the exporter writes it (Pow, ReduceMean, Add, Sqrt, Div, Mul, Mul)."""
    nodes = [
        helper.make_node("Pow", [x, "two"], [f"{prefix}_sq"], name=f"{prefix}_pow"),
        helper.make_node("ReduceMean", [f"{prefix}_sq"], [f"{prefix}_ms"], name=f"{prefix}_mean", axes=[-1]),
        helper.make_node("Add", [f"{prefix}_ms", "eps"], [f"{prefix}_mse"], name=f"{prefix}_eps"),
        helper.make_node("Sqrt", [f"{prefix}_mse"], [f"{prefix}_rms"], name=f"{prefix}_sqrt"),
        helper.make_node("Div", ["one", f"{prefix}_rms"], [f"{prefix}_inv"], name=f"{prefix}_div"),
        helper.make_node("Mul", [x, f"{prefix}_inv"], [f"{prefix}_unit"], name=f"{prefix}_scale"),
        helper.make_node("Mul", [gain, f"{prefix}_unit"], [f"{prefix}_out"], name=f"{prefix}_gain"),
    ]
    return nodes, f"{prefix}_out"


def toy_decoder(width: int, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """token lookup, image rows placed by Where, one block (attention-like and MLP-like, with biases),
    the last row gathered, a final norm and an L2 normalisation: the shapes of pue's decoder graph."""
    rng = np.random.default_rng(seed)
    gains = {f"g{i}": rng.uniform(0.5, 2.0, width).astype(np.float32) for i in (1, 2, 3)}
    gains["g1"][1] = 100.0  # a norm-gain outlier channel
    weights = {
        "embed": rng.normal(size=(VOCAB, width)),
        "wq": rng.normal(size=(width, INNER)),
        "bq": rng.normal(size=INNER),
        "wk": rng.normal(size=(width, INNER)),
        "wo": rng.normal(size=(INNER, width)),
        "bo": rng.normal(size=width),
        "wu": rng.normal(size=(width, INNER)),
        "wd": rng.normal(size=(INNER, width)),
    }
    init = {k: v.astype(np.float32) for k, v in weights.items()} | gains
    init |= {
        "two": np.float32(2.0),
        "eps": np.float32(1e-6),
        "one": np.float32(1.0),
        "last": np.int64(SEQ - 1),
        "flat": np.array([-1, width], np.int64),
    }
    norm1, n1 = _rms_norm("n1", "h0", "g1")
    norm2, n2 = _rms_norm("n2", "h1", "g2")
    final, nf = _rms_norm("nf", "pooled", "g3")
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["tokens"], name="embed_tokens"),
        helper.make_node("Shape", ["tokens"], ["shape_of_tokens"], name="tokens_shape"),
        helper.make_node("Reshape", ["image_features", "flat"], ["features_flat"], name="features_reshape"),
        helper.make_node("Reshape", ["features_flat", "shape_of_tokens"], ["features"], name="features_back"),
        helper.make_node("Where", ["is_image", "features", "tokens"], ["h0"], name="place"),
        *norm1,
        helper.make_node("MatMul", [n1, "wq"], ["q"], name="q_proj"),
        helper.make_node("Add", ["q", "bq"], ["qb"], name="q_bias"),
        helper.make_node("Gather", [n1, "last"], ["n1_last"], name="row", axis=1),
        helper.make_node("MatMul", ["n1_last", "wk"], ["k"], name="k_proj"),
        helper.make_node("Unsqueeze", ["k", "axis1"], ["k3"], name="k_unsqueeze"),
        helper.make_node("Mul", ["qb", "k3"], ["qk"], name="attention_like"),
        helper.make_node("MatMul", ["qk", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "bo"], ["ob"], name="o_bias"),
        helper.make_node("Add", ["h0", "ob"], ["h1"], name="residual1"),
        *norm2,
        helper.make_node("MatMul", [n2, "wu"], ["u"], name="up_proj"),
        helper.make_node("Tanh", ["u"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "wd"], ["d"], name="down_proj"),
        helper.make_node("Add", ["h1", "d"], ["h2"], name="residual2"),
        helper.make_node("Gather", ["h2", "last"], ["pooled"], name="pool", axis=1),
        *final,
        helper.make_node("ReduceL2", [nf], ["length"], name="length", axes=[-1], keepdims=1),
        helper.make_node("Div", [nf, "length"], ["sentence_embedding"], name="unit"),
    ]
    init["axis1"] = np.array([1], np.int64)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, SEQ]),
        helper.make_tensor_value_info("is_image", TensorProto.BOOL, [2, SEQ, 1]),
        float_input("image_features", [2, SEQ, width]),
    ]
    model = make_model(nodes, inputs, ["sentence_embedding"], init)
    feed = {
        "input_ids": rng.integers(0, VOCAB, size=(2, SEQ)).astype(np.int64),
        "is_image": rng.random((2, SEQ, 1)) < 0.5,
        "image_features": rng.normal(size=(2, SEQ, width)).astype(np.float32) * 3,
    }
    return model, feed


@pytest.mark.parametrize("width", [8, 6])
def test_every_fold_keeps_the_function(width):
    model, feed = toy_decoder(width)
    rotated = copy.deepcopy(model)
    summary = rotate_decoder(rotated, seed=1)
    q, kind = orthogonal_matrix(width, seed=1)
    assert summary.kind == kind and summary.width == width and summary.norms_folded == 2

    (before,), (after,) = run(model, feed), run(rotated, feed)
    assert np.allclose(before, after, atol=2e-6)
    assert rotation_cosine(model, rotated, [feed]) >= 0.999999

    def original(name: str) -> np.ndarray:
        return initializer(model, name).astype(np.float64)

    def now(node: str, index: int = 1) -> np.ndarray:
        return initializer(rotated, node_by_name(rotated, node).input[index])

    # readers: the norm gain folded in, then Qᵀ (q_proj reads the norm directly, k_proj through a row Gather)
    assert sorted(summary.readers) == ["k_proj", "q_proj", "up_proj"]
    assert np.allclose(now("q_proj"), q.T @ (original("g1")[:, None] * original("wq")), atol=1e-4)
    assert np.allclose(now("k_proj"), q.T @ (original("g1")[:, None] * original("wk")), atol=1e-4)
    assert np.allclose(now("up_proj"), q.T @ (original("g2")[:, None] * original("wu")), atol=1e-5)
    assert np.array_equal(now("q_bias"), original("bq").astype(np.float32))  # a reader's bias is not in the stream
    assert np.array_equal(now("n1_gain", 0), np.ones(width, np.float32))  # gains are now 1
    # writers: W·Q, their biases b·Q, the token table E·Q
    assert sorted(summary.writers) == ["down_proj", "o_proj"] and summary.biases == ["o_bias"]
    assert np.allclose(now("o_proj"), original("wo") @ q, atol=1e-5)
    assert np.allclose(now("o_bias", 1), original("bo") @ q, atol=1e-5)
    assert np.allclose(now("embed_tokens", 0), original("embed") @ q, atol=1e-5)
    # the final norm keeps its gain and reads the pooled row rotated back
    assert np.array_equal(now("nf_gain", 0), original("g3").astype(np.float32))
    undo = node_by_name(rotated, "pue_rotation_undo")
    assert node_by_name(rotated, "nf_pow").input[0] == undo.output[0] == node_by_name(rotated, "nf_scale").input[0]
    # image_features enter in the model's basis and are rotated at the decoder's input
    assert node_by_name(rotated, "features_reshape").input[0] == "pue_rotation_image_features_output"
    # the two inserted products hold Constant matrices: the INT8 search never quantizes them
    assert {op.node for op in weight_ops(rotated, "decoder")} == {op.node for op in weight_ops(model, "decoder")}


def test_rotation_flattens_a_norm_gain_outlier_channel():
    model, feed = toy_decoder(64)
    rotated = copy.deepcopy(model)
    rotate_decoder(rotated)
    feeds = [feed]

    def q_proj_ratio(m: onnx.ModelProto) -> float:
        ops = [op for op in weight_ops(m, "decoder") if op.node == "q_proj"]
        return collect_outliers(m, ops, feeds)[0].channel_ratio

    assert q_proj_ratio(model) > 20 and q_proj_ratio(rotated) < 5


@pytest.mark.parametrize(("outlier_in", "rotated"), [("gain", False), ("residual", True)])
def test_auto_rotates_only_for_outliers_the_gains_do_not_explain(tmp_path, outlier_in, rotated):
    from pue.calibration.rotation import rotate_for_int8

    model, feed = toy_decoder(64)
    gain = next(i for i in model.graph.initializer if i.name == "g1")
    gains = np.ones(64, np.float32)
    gains[1] = 100.0 if outlier_in == "gain" else 1.0
    gain.CopyFrom(onnx.numpy_helper.from_array(gains, "g1"))
    if outlier_in == "residual":  # channel 7 of every token 1000x, from the table and the image features alike
        table = next(i for i in model.graph.initializer if i.name == "embed")
        values = onnx.numpy_helper.to_array(table).copy()
        values[:, 7] *= 1000
        table.CopyFrom(onnx.numpy_helper.from_array(values, "embed"))
        feed["image_features"][..., 7] *= 1000
    path = tmp_path / "decoder.onnx"
    onnx.save(model, str(path))
    models = {"decoder": model}
    record = rotate_for_int8(models, path, lambda n: [feed], "auto")
    assert record["channel_ratio_before"] >= 20
    assert record["applied"] is rotated
    if rotated:
        assert record["channel_ratio_after"] < 5 and record["rotation"]["check_min_cosine"] >= 0.99999
    else:
        assert record["channel_ratio_without_gains"] < 20 and "come from the gains" in record["why"]


def test_find_rms_norms_reads_the_gains():
    model, _ = toy_decoder(8)
    norms = find_rms_norms(model)
    assert [n.gain_node for n in norms] == ["n1_gain", "n2_gain", "nf_gain"]
    assert norms[0].residual == "h0" and norms[0].gain[1] == pytest.approx(100.0)


def test_refuses_a_raw_reader_of_the_residual_stream():
    model, _ = toy_decoder(8)
    model.graph.node.append(helper.make_node("MatMul", ["h1", "wq"], ["raw"], name="unnormed_reader"))
    model.graph.output.add(name="raw")
    with pytest.raises(RotationError, match="unnormed_reader reads the residual stream"):
        rotate_decoder(model)


def test_refuses_a_writer_it_cannot_fold():
    model, _ = toy_decoder(8)
    for node in model.graph.node:
        if node.name == "act":
            node.op_type = "Sin"
        if node.name == "residual2":
            node.input[1] = "a_wide"
    model.graph.node.append(helper.make_node("Relu", ["d"], ["a_wide"], name="relu_writer"))
    with pytest.raises(RotationError, match="Relu relu_writer writes the residual stream"):
        rotate_decoder(model)


def _decoder_rows(bundle, count: int):
    """The first `count` decoder calibration rows (image, text and composed prompts) of a bundle."""
    from pue.calibration.readers import DecoderFeeds, default_captions, make_plan
    from pue.calibration.sampling import sample_patches
    from pue.calibration.sources import open_sources
    from pue.runtime import Embedder

    embedder = Embedder.load(bundle)
    patches, _ = sample_patches(open_sources(None, patch_size=embedder.manifest.tile_size), 4)
    plan = make_plan(patches, default_captions(4))
    return lambda limit=None: DecoderFeeds(embedder, plan, limit or count)


def _rotate_bundle_decoder(bundle, mode: str) -> tuple[dict, onnx.ModelProto]:
    from pue.calibration.rotation import rotate_for_int8

    path = bundle / "decoder.onnx"
    models = {"decoder": onnx.load(str(path))}
    record = rotate_for_int8(models, path, _decoder_rows(bundle, 6), mode)
    return record, models["decoder"]


@pytest.fixture(scope="module")
def rotated_decoder():
    """rotated_decoder(bundle, mode) → _rotate_bundle_decoder's (record, decoder), once per bundle and mode for the
    module (the outlier-fixture tests and the flattening tests rotate the same gains bundles "on"); read only."""
    cache: dict[tuple[str, str], tuple[dict, onnx.ModelProto]] = {}

    def rotate(bundle, mode: str) -> tuple[dict, onnx.ModelProto]:
        key = (str(bundle), mode)
        if key not in cache:
            cache[key] = _rotate_bundle_decoder(bundle, mode)
        return cache[key]

    return rotate


def test_exported_decoder_keeps_its_embedding(fp32_bundle):
    record, rotated = _rotate_bundle_decoder(fp32_bundle("llava_next", "ci"), "on")
    rotation = record["rotation"]
    assert record["applied"] and rotation["kind"] == "randomized-hadamard" and rotation["width"] == 64
    assert rotation["check_min_cosine"] >= 0.99999
    # 5 readers and 2 writers per block, the pooled last block included; the table; the two inserted products
    assert len(rotation["readers"]) == 5 * (rotation["norms_folded"] // 2) and rotation["embedding"]
    assert rotation["inserted"] == ["pue_rotation_image_features", "pue_rotation_undo"]
    assert {n.name for n in rotated.graph.node} >= set(rotation["readers"] + rotation["writers"])


def test_auto_leaves_a_decoder_without_channel_outliers_alone(fp32_bundle):
    record, rotated = _rotate_bundle_decoder(fp32_bundle("llava_next", "ci"), "auto")
    assert not record["applied"] and record["channel_ratio_before"] < 20
    assert not any(n.name.startswith("pue_rotation_") for n in rotated.graph.node)


def test_fp16_refuses_rotate_on(fp32_bundle, tmp_path):
    from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle
    from pue.errors import PueError

    options = QuantizeOptions(precision="fp16", rotate="on", num_patches=2, num_captions=2)
    with pytest.raises(PueError, match="--rotate on prepares INT8 activations"):
        quantize_bundle(fp32_bundle("llava_next", "ci"), tmp_path / "fp16", options)
    assert not (tmp_path / "fp16").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava_next", "llava"])
@pytest.mark.parametrize("preset", ["gains-few", "gains-all", "massive"])
def test_outlier_fixtures_keep_their_embedding(fp32_bundle, rotated_decoder, arch, preset):
    record, _ = rotated_decoder(fp32_bundle(arch, preset), "on")
    assert record["applied"] and record["rotation"]["check_min_cosine"] >= 0.99999


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava_next", "llava"])
@pytest.mark.parametrize("preset", ["gains-few", "gains-all"])
def test_norm_gain_outlier_channels_are_flattened(fp32_bundle, rotated_decoder, outlier_report, arch, preset):
    bundle = fp32_bundle(arch, preset)
    record, _ = rotated_decoder(bundle, "on")
    assert record["applied"] and record["channel_ratio_before"] >= 50 and record["channel_ratio_after"] < 5
    # the outliers are the gains' doing: auto does not rotate (BENCHMARKS.md, "Rotation": it measured worse)
    auto, _ = _rotate_bundle_decoder(bundle, "auto")
    assert not auto["applied"] and auto["channel_ratio_without_gains"] < 20

    normed = set(record["rotation"]["readers"])
    for rotate in (False, True):
        report = outlier_report(arch, preset, rotate=rotate)["decoder"]
        worst = max(t.channel_ratio for t in report if set(t.readers) & normed)
        assert worst < 5 if rotate else worst >= 50


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava_next", "llava"])
def test_auto_does_not_rotate_for_massive_tokens(fp32_bundle, arch):
    """Massive activations are token outliers at the `down_proj` inputs (the MLP's inner width): a rotation of the
    residual stream leaves them where they are, and the normed activations carry no channel outlier to flatten."""
    record, _ = _rotate_bundle_decoder(fp32_bundle(arch, "massive"), "auto")
    assert not record["applied"] and record["channel_ratio_before"] < 20
