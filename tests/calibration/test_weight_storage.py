"""8-bit INT8 weights stored as uint8 around 128 (`pue.calibration.weight_storage`): the same numbers as the int8
levels, and onnxruntime's fused INT8 kernels compute them exactly on every CPU, where full-range int8 weights
saturate on x86 CPUs without VNNI (this one, if `saturating_u8s8()` says so)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import float_input, make_model, run

from pue.calibration.int8 import quantize_dynamic_graph, quantize_static_graph
from pue.calibration.readers import OrtReader
from pue.calibration.weight_storage import store_weights_unsigned
from pue.runtime.cpu import saturating_u8s8

K, N = 64, 16


def fused(model, feed):
    """Run with onnxruntime's graph optimizations on: Q/DQ pairs fused into its integer kernels."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def qdq_matmul(levels: np.ndarray) -> object:
    """x (uint8 levels 0..255 at scale 1) × int8 weight levels (scale 1 per column, zero point 0), as Q/DQ pairs."""
    k, n = levels.shape
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    initializers = {
        "one": np.array(1.0, np.float32),
        "x_zero": np.array(0, np.uint8),
        "w": levels.astype(np.int8),
        "w_scale": np.ones(n, np.float32),
        "w_zero": np.zeros(n, np.int8),
    }
    return make_model(nodes, [float_input("x", ["rows", k])], ["y"], initializers)


def test_unsigned_storage_is_the_same_numbers_and_exact_where_int8_saturates():
    """Activations at 255 against weights at +127 in every row: each pair of products sums to 64,770, twice what the
    int16 pair sums of a u8×s8 kernel without VNNI hold. Stored as uint8, the fused kernel gives the exact product."""
    rng = np.random.default_rng(0)
    levels = np.where(rng.random((K, N)) < 0.5, 127, 126)
    levels[:, 1] = -127
    x = np.full((4, K), 255.0, np.float32)
    exact = x @ levels.astype(np.float32)
    signed = qdq_matmul(levels)
    unsigned = qdq_matmul(levels)
    assert store_weights_unsigned(unsigned) == ["w"]
    weights = {init.name: init for init in unsigned.graph.initializer}
    assert weights["w_u8"].data_type == TensorProto.UINT8 and "w" not in weights
    np.testing.assert_array_equal(numpy_helper.to_array(weights["w_u8"]).astype(int) - 128, levels)
    np.testing.assert_array_equal(numpy_helper.to_array(weights["w_u8_zero_point"]), np.full(N, 128))
    # the same numbers: computed in float (Q/DQ as written) both give the exact product
    np.testing.assert_array_equal(run(unsigned, {"x": x})[0], exact)
    np.testing.assert_array_equal(run(signed, {"x": x})[0], exact)
    # onnxruntime's integer kernels: exact with uint8 weights on every CPU; int8 ones saturate on this one if it has
    # no VNNI or AMX (the reason onnxruntime bundles keep 7-bit weights unless the search stores 8 bits this way)
    np.testing.assert_array_equal(fused(unsigned, {"x": x}), exact)
    if saturating_u8s8():
        assert np.abs(fused(signed, {"x": x}) - exact).max() > 1000


def test_static_and_dynamic_quantizers_give_8_bit_levels_that_storage_keeps(tmp_path):
    """onnxruntime's quantizers with `full_weights` write ±127 levels (7-bit: ±64); stored as uint8, the graphs compute
    what the int8 graphs computed in float, and closer to the float MatMul than 7-bit weights."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [float_input("x", ["rows", K])],
        ["y"],
        {"w": weight},
    )
    source = tmp_path / "float.onnx"
    source.write_bytes(model.SerializeToString())
    rows = [{"x": rng.normal(size=(32, K)).astype(np.float32)} for _ in range(2)]
    x = rows[0]["x"]
    errors = {}
    for kind in ("static", "dynamic"):
        for full in (False, True):
            out = tmp_path / f"{kind}-{full}.onnx"
            if kind == "static":
                quantize_static_graph(source, out, OrtReader(rows), ["mm"], "onnxruntime", full_weights=full)
            else:
                quantize_dynamic_graph(source, out, ["mm"], full_weights=full)
            import onnx

            quantized = onnx.load(str(out))
            levels = numpy_helper.to_array(next(i for i in quantized.graph.initializer if i.name == "w_quantized"))
            assert np.abs(levels.astype(int)).max() == (127 if full else 64)
            before = run(quantized, {"x": x})[0] if kind == "static" else fused(quantized, {"x": x})
            assert store_weights_unsigned(quantized) == ["w_quantized"]
            after = run(quantized, {"x": x})[0] if kind == "static" else fused(quantized, {"x": x})
            np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)
            np.testing.assert_allclose(fused(quantized, {"x": x}), before, rtol=0, atol=1e-3)
            errors[kind, full] = float(np.abs(after - x @ weight).max())
    for kind in ("static", "dynamic"):
        assert errors[kind, True] < errors[kind, False], errors


def test_weights_another_node_reads_or_with_a_zero_point_stay_int8():
    levels = np.ones((K, N), np.int8)
    shared = qdq_matmul(levels)
    shared.graph.node.append(helper.make_node("Identity", ["w"], ["w_copy"]))
    assert store_weights_unsigned(shared) == []
    offset = qdq_matmul(levels)
    for init in offset.graph.initializer:
        if init.name == "w_zero":
            init.CopyFrom(numpy_helper.from_array(np.full(N, 3, np.int8), "w_zero"))
    assert store_weights_unsigned(offset) == []
