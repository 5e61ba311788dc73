"""Bias correction of the vision graph's outputs (`pue.calibration.output_bias`): the rewrite is exact, and a shift
measured on some patches removes the quantized graph's systematic error on others."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pue.calibration.graph_ops import weight_ops
from pue.calibration.int8 import quantize_dynamic_graph
from pue.calibration.output_bias import PREFIX, correct_outputs, output_means, shift_record
from pue.data import patch_set
from pue.runtime import Embedder


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))


def test_correct_outputs_subtracts_the_shift_and_leaves_the_graphs_other_readers_alone():
    """An output that the graph also reads: the output loses its shift, the reader inside still gets the raw tensor."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 5, 3]),
        ],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": rng.standard_normal((2, 5, 4)).astype(np.float32)}
    before = _run(model, feed)
    shift = np.array([0.5, -1.0, 2.0])
    correct_outputs(model, {"y": shift})
    onnx.checker.check_model(model)
    after = _run(model, feed)
    np.testing.assert_allclose(after["y"], before["y"] - shift.astype(np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(after["z"], before["z"])
    assert any(node.name.startswith(PREFIX) and node.op_type == "Add" for node in model.graph.node)
    means = output_means(model, [feed])
    np.testing.assert_allclose(means["y"][0], after["y"].reshape(-1, 3).mean(axis=0), rtol=1e-5, atol=1e-6)
    # an output with a layer axis after its tokens (Qwen3-VL's DeepStack features): one shift per layer and channel
    stacked = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["s"], ["t"])],
            "stacked",
            [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 5, 3, 4])],
            [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 5, 3, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    values = rng.standard_normal((2, 5, 3, 4)).astype(np.float32) + np.arange(3, dtype=np.float32)[:, None]
    layered = output_means(stacked, [{"s": values}])["t"][0]
    assert layered.shape == (3, 4)
    np.testing.assert_allclose(layered, np.maximum(values, 0).mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
    record = shift_record({"y": shift}, {"y": means["y"][1]})
    assert record["y"]["max_abs"] == 2.0 and record["y"]["relative"] > 0


def test_a_shift_measured_on_calibration_patches_removes_the_error_mean_on_held_out_ones(fp32_bundle, tmp_path):
    """The tiny LLaVA-NeXT's vision graph with int8 weights: the error's mean over held-out patches' tokens (which the
    decoder adds up over a row of images) falls once the shift measured on calibration patches is removed, and the
    error's size does not grow."""
    parent = fp32_bundle("llava_next", "ci")
    path = parent / "vision.onnx"
    model = onnx.load(str(path))
    quantized_path = tmp_path / "vision.int8.onnx"
    quantize_dynamic_graph(path, quantized_path, [op.node for op in weight_ops(model, "vision")])
    quantized = onnx.load(str(quantized_path))
    with Embedder.load(parent) as embedder:
        calibration = [{"pixel_values": embedder.pixel_values([p])} for p in list(patch_set("calibration"))[:16]]
        heldout = [{"pixel_values": embedder.pixel_values([p])} for p in list(patch_set("heldout"))[:16]]
    floats = output_means(path, calibration)
    means = output_means(quantized, calibration)
    shifts = {name: means[name][0] - floats[name][0] for name in floats}

    def error(graph):
        rows = [(_run(graph, f)["image_features"] - _run(model, f)["image_features"]) for f in heldout]
        errors = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows])
        return np.linalg.norm(errors.mean(axis=0)), np.sqrt((errors**2).sum(axis=1).mean())

    mean_before, size_before = error(quantized)
    correct_outputs(quantized, shifts)
    mean_after, size_after = error(quantized)
    assert mean_after < 0.5 * mean_before, (mean_before, mean_after)
    assert size_after < size_before
