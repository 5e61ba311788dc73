"""Scale and zero-point of each Q/DQ flavour, by hand on a small graph, against what int8.py writes into it; and the
numpy simulation the sensitivity ranking uses (simulate.py) against what onnxruntime computes with that graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_graphs import float_input, initializer, make_model, node_by_name, run

from pue.calibration.int8 import activation_scheme, quantize_dynamic_graph, quantize_static_graph
from pue.calibration.readers import OrtReader
from pue.calibration.simulate import WEIGHT_QMAX, qdq_activation, qdq_weight
from pue.errors import PueError

LO, HI = -1.0, 6.0  # the calibrated range of x


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    w[1, 2] = -3.5  # column 2's largest |value| is negative: symmetric scales use |·|
    return w


@pytest.fixture(scope="module")
def feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    xs = [rng.uniform(LO + 0.1, HI - 0.1, size=(5, 4)).astype(np.float32) for _ in range(3)]
    xs[0][0, 0], xs[2][1, 3] = LO, HI
    return [{"x": x} for x in xs]


@pytest.fixture(scope="module")
def float_graph(tmp_path_factory, weight):
    path = tmp_path_factory.mktemp("int8") / "float.onnx"
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")],
        [float_input("x", ["rows", 4])],
        ["h"],
        {"w": weight},
    )
    onnx.save(model, str(path))
    return path


def quantized_input(model: onnx.ModelProto, tensor: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero_point) of the QuantizeLinear that reads `tensor`."""
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return initializer(model, node.input[1]), initializer(model, node.input[2])


def check_weight(model: onnx.ModelProto, weight: np.ndarray, qmax: int) -> None:
    """Per-output-channel symmetric int8: scale_n = max_k |W[k, n]| / qmax, zero point 0, along axis 1 (qmax 64:
    the 7-bit range of the u8×s8 flavours, which cannot saturate on CPUs without VNNI; 127 for TensorRT)."""
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_quantized")
    assert [(a.name, a.i) for a in dq.attribute] == [("axis", 1)]
    quantized, scale, zero_point = (initializer(model, name) for name in dq.input)
    np.testing.assert_allclose(scale, np.abs(weight).max(axis=0) / qmax, rtol=1e-6)
    assert zero_point.dtype == np.int8 and not zero_point.any()
    assert quantized.dtype == np.int8
    np.testing.assert_array_equal(quantized, np.round(weight / scale))
    assert (np.abs(quantized).max(axis=0) == qmax).all()  # each column's extreme lands on ±qmax
    assert quantized[1, 2] == -qmax
    assert not any(init.name == "w" for init in model.graph.initializer)  # no float copy left behind


@pytest.mark.parametrize(
    ("target", "scheme", "dtype", "scale", "zero_point"),
    [
        # unsigned asymmetric over [min(lo, 0), max(hi, 0)]: scale 7/255, zero point round(1 / scale) = 36
        ("onnxruntime", "u8", np.uint8, (HI - LO) / 255, round(-LO / ((HI - LO) / 255))),
        # signed symmetric over ±max(|lo|, |hi|) with ±127: scale 6/127, zero point 0
        ("tensorrt", "s8", np.int8, max(abs(LO), abs(HI)) / 127, 0),
    ],
)
def test_static_scale_and_zero_point(float_graph, feeds, weight, tmp_path, target, scheme, dtype, scale, zero_point):
    out = tmp_path / "int8.onnx"
    quantize_static_graph(float_graph, out, OrtReader(feeds), ["mm"], target)
    model = onnx.load(str(out))
    assert activation_scheme("int8", target) == scheme

    x_scale, x_zero_point = quantized_input(model, "x")
    assert zero_point == (36 if target == "onnxruntime" else 0)
    assert x_scale.shape == () and x_scale == pytest.approx(scale, rel=1e-6)
    assert x_zero_point.dtype == dtype and int(x_zero_point) == zero_point
    check_weight(model, weight, WEIGHT_QMAX[scheme])

    # inputs only: the MatMul's output stays float (onnxruntime's QDQ quantizer would quantize it per tensor by
    # default, one range for every token: a residual writer carrying a massive token would zero the others)
    output = node_by_name(model, "mm").output[0]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == output for n in model.graph.node)

    # the graph's MatMul computes what the sensitivity simulation assumes, clipping included
    x = np.random.default_rng(2).uniform(LO, HI, size=(7, 4)).astype(np.float32)
    x[0, 1] = HI + 2.0  # beyond the calibrated range: saturates at 255 (u8) or +127 (s8)
    (got,) = run(model, {"x": x}, [node_by_name(model, "mm").output[0]])
    want = qdq_activation(x, LO, HI, scheme) @ qdq_weight(weight, WEIGHT_QMAX[scheme])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dynamic_scale_and_zero_point(float_graph, weight, tmp_path):
    out = tmp_path / "dynamic.onnx"
    quantize_dynamic_graph(float_graph, out, ["mm"])
    model = onnx.load(str(out))
    assert activation_scheme("int8-dynamic", "onnxruntime") == "dynamic"
    ops = [n.op_type for n in model.graph.node]
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    integer = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
    assert list(integer.input[1:4:2]) == ["w_quantized", "w_zero_point"]
    scale = initializer(model, "w_scale")
    np.testing.assert_allclose(scale, np.abs(weight).max(axis=0) / 64, rtol=1e-6)  # 7-bit weights
    quantized = initializer(model, "w_quantized")
    assert quantized.dtype == np.int8 and not initializer(model, "w_zero_point").any()
    np.testing.assert_array_equal(quantized, np.round(weight / scale))

    # DynamicQuantizeLinear: uint8 over each tensor's own [min(x, 0), max(x, 0)]
    x = np.random.default_rng(3).uniform(-2.0, 9.0, size=(6, 4)).astype(np.float32)
    (got,) = run(model, {"x": x}, ["h"])
    np.testing.assert_allclose(
        got, qdq_activation(x, 0.0, 0.0, "dynamic") @ qdq_weight(weight, 64), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_only_the_listed_nodes_are_quantized(tmp_path, weight, feeds, precision):
    second = np.random.default_rng(4).normal(size=(3, 2)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="kept_float"),
        ],
        [float_input("x", ["rows", 4])],
        ["y"],
        {"w": weight, "w2": second},
    )
    onnx.save(model, str(tmp_path / "float.onnx"))
    out = tmp_path / "int8.onnx"
    if precision == "int8":
        quantize_static_graph(tmp_path / "float.onnx", out, OrtReader(feeds), ["mm"], "onnxruntime")
    else:
        quantize_dynamic_graph(tmp_path / "float.onnx", out, ["mm"])
    quantized = onnx.load(str(out))
    kept = node_by_name(quantized, "kept_float")
    assert kept.op_type == "MatMul" and kept.input[1] == "w2"
    w2 = next(init for init in quantized.graph.initializer if init.name == "w2")
    assert w2.data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(initializer(quantized, "w2"), second)
    assert initializer(quantized, "w_quantized").dtype == np.int8


def test_nothing_to_quantize_is_refused(float_graph, feeds, tmp_path):
    with pytest.raises(PueError, match="no weight-bearing op"):
        quantize_static_graph(float_graph, tmp_path / "a.onnx", OrtReader(feeds), [], "onnxruntime")
    with pytest.raises(PueError, match="no weight-bearing MatMul"):
        quantize_dynamic_graph(float_graph, tmp_path / "b.onnx", [])
