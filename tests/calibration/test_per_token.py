"""Per-token dynamic INT8 (issue 14, item 3): the rewritten MatMul computes each row's own symmetric 8-bit
quantization by hand, runs onnxruntime's integer kernel, and keeps ordinary rows exact where a massive row ruins
onnxruntime's per-tensor dynamic MatMul."""

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


def test_each_row_has_its_own_scale_and_massive_rows_do_not_starve_the_others(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 5)).astype(np.float32)
    x = rng.normal(size=(2, 6, 8)).astype(np.float32)
    x[0, 0] *= 2000.0  # a massive token
    model = graph(weight)
    onnx.save(model, str(tmp_path / "float.onnx"))
    rewritten = graph(weight)
    assert quantize_per_token(rewritten, weight_ops(rewritten, "decoder"), weight_qmax=64) == ["mm"]
    ops = {node.op_type for node in rewritten.graph.node}
    assert "MatMulInteger" in ops and "MatMul" not in ops
    (got,) = run(rewritten, {"x": x}, ["h"])

    # by hand: symmetric per row over max|x_row| / 127, 7-bit per-column weights
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    want = np.round(x / scale) * scale @ qdq_weight(weight, 64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    exact = x @ weight
    quantize_dynamic_graph(tmp_path / "float.onnx", tmp_path / "dynamic.onnx", ["mm"])
    (per_tensor,) = run(onnx.load(str(tmp_path / "dynamic.onnx")), {"x": x}, ["h"])

    def error(y: np.ndarray) -> float:  # relative error over the ordinary rows
        ordinary = np.ones(x.shape[:2], bool)
        ordinary[0, 0] = False
        return float(np.linalg.norm(y[ordinary] - exact[ordinary]) / np.linalg.norm(exact[ordinary]))

    assert error(got) < 0.03  # 7-bit weights and 8-bit rows
    assert error(per_tensor) > 0.3  # one step for the whole tensor, set by the massive token
