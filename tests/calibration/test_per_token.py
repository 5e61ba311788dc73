"""Per-token dynamic INT8 (issue 14, item 3): the rewritten MatMul computes each row's own asymmetric 8-bit
quantization by hand, runs onnxruntime's u8×u8 integer kernel with 8-bit weights (exact on every CPU), and keeps
ordinary rows exact where a massive row ruins onnxruntime's per-tensor dynamic MatMul."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
from onnx_graphs import float_input, make_model, run

from pue.calibration.graph_ops import weight_ops
from pue.calibration.int8 import quantize_dynamic_graph
from pue.calibration.per_token import quantize_per_token
from pue.calibration.simulate import qdq_weight


def graph(weight: np.ndarray) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")],
        [float_input("x", ["batch", "rows", 8])],
        ["h"],
        {"w": weight},
    )


def per_row(x: np.ndarray) -> np.ndarray:
    """By hand: asymmetric uint8 per row over [min(x_row, 0), max(x_row, 0)] in 255 steps, dequantized."""
    lo, hi = np.minimum(x.min(axis=-1, keepdims=True), 0), np.maximum(x.max(axis=-1, keepdims=True), 0)
    scale = (hi - lo) / 255.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def test_each_row_has_its_own_scale_and_massive_rows_do_not_starve_the_others(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 5)).astype(np.float32)
    x = rng.normal(size=(2, 6, 8)).astype(np.float32)
    x[0, 0] *= 2000.0  # a massive token
    model = graph(weight)
    onnx.save(model, str(tmp_path / "float.onnx"))
    rewritten = graph(weight)
    assert quantize_per_token(rewritten, weight_ops(rewritten, "decoder")) == ["mm"]
    ops = {node.op_type for node in rewritten.graph.node}
    assert "MatMulInteger" in ops and "MatMul" not in ops
    (got,) = run(rewritten, {"x": x}, ["h"])

    want = per_row(x) @ qdq_weight(weight, 127)  # 8-bit per-column weights
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    exact = x @ weight
    quantize_dynamic_graph(tmp_path / "float.onnx", tmp_path / "dynamic.onnx", ["mm"])
    (per_tensor,) = run(onnx.load(str(tmp_path / "dynamic.onnx")), {"x": x}, ["h"])

    def error(y: np.ndarray) -> float:  # relative error over the ordinary rows
        ordinary = np.ones(x.shape[:2], bool)
        ordinary[0, 0] = False
        return float(np.linalg.norm(y[ordinary] - exact[ordinary]) / np.linalg.norm(exact[ordinary]))

    assert error(got) < 0.02  # 8-bit weights and rows
    assert error(per_tensor) > 0.3  # one step for the whole tensor, set by the massive token


def test_full_range_weights_and_rows_do_not_saturate():
    """Rows at levels 0 and 255 against weights at ±127 in every column: the worst case for the pair sums of CPUs
    without VNNI (the u8×s8 kernel saturates at 32,767 there); the u8×u8 kernel gives the exact integer product."""
    rng = np.random.default_rng(1)
    weight = rng.choice([-1.0, 1.0], size=(64, 16)).astype(np.float32)
    x = rng.choice([-1.0, 1.0], size=(1, 32, 64)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")],
        [float_input("x", ["batch", "rows", 64])],
        ["h"],
        {"w": weight},
    )
    quantize_per_token(model, weight_ops(model, "decoder"))
    (got,) = run(model, {"x": x}, ["h"])
    np.testing.assert_allclose(got, per_row(x) @ weight, rtol=1e-6, atol=1e-4)  # ±1 weights are exact at ±127


def test_a_one_sided_row_gets_all_255_levels():
    """Rows after GELU are mostly positive: their step is max / 255, half of a symmetric ±max / 127 step."""
    rng = np.random.default_rng(2)
    weight = np.eye(8, dtype=np.float32)
    x = rng.uniform(0.0, 1.0, size=(1, 4, 8)).astype(np.float32)
    x[..., 0] = 1.0
    model = graph(weight)
    quantize_per_token(model, weight_ops(model, "decoder"))
    (got,) = run(model, {"x": x}, ["h"])
    assert np.abs(got - x).max() <= 0.5 / 255 + 1e-6
