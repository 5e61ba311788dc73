"""The FP16 keep-list from calibrated ranges: ops whose calibrated |activation| exceeds 16,000 stay FP32, the others
are converted; delicate reductions join the keep-list only when the gate fails with the activation rule alone."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx_graphs import float_input, make_model, run
from onnxruntime.transformers.float16 import convert_float_to_float16

from pue.calibration.fp16 import (
    DELICATE_OPS,
    FP16_SAFE_LIMIT,
    FP16_STAT_SAMPLES,
    convert_fp16,
    convert_with_gate,
    nodes_over_limit,
)


def test_nodes_over_limit_is_strictly_over():
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["at_limit"], name="a"),
            helper.make_node("Relu", ["at_limit"], ["over"], name="b"),
            helper.make_node("Relu", ["over"], ["infinite"], name="c"),
            helper.make_node("Relu", ["infinite"], ["unmeasured"], name="d"),
        ],
        [float_input("x", [2])],
        ["unmeasured"],
        {},
    )
    absmax = {"at_limit": FP16_SAFE_LIMIT, "over": FP16_SAFE_LIMIT + 0.5, "infinite": float("inf")}
    assert FP16_SAFE_LIMIT == 16_000.0
    # writers and readers of an over-limit tensor: an FP16 reader would get it through a Cast to FP16 (inf over 65,504)
    assert nodes_over_limit(model, absmax) == ["b", "c", "d"]
    assert nodes_over_limit(model, absmax, limit=20_000.0) == ["c", "d"]


@dataclass
class Verdict:
    passed: bool
    overall: dict


def big_then_small():
    """x (|x| ≤ 20) · 1000 → up to 20,000 (over the limit), · 0.001 → back to ≤ 20, Softmax, MatMul: small."""
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Mul", ["x", "thousand"], ["up"], name="scale_up"),
            helper.make_node("Mul", ["up", "milli"], ["down"], name="scale_down"),
            helper.make_node("Softmax", ["down"], ["probs"], name="softmax", axis=-1),
            helper.make_node("MatMul", ["probs", "w"], ["y"], name="mm"),
        ],
        [float_input("x", ["rows", 4])],
        ["y"],
        {
            "thousand": np.array(1000.0, np.float32),
            "milli": np.array(0.001, np.float32),
            "w": rng.normal(size=(4, 3)).astype(np.float32),
        },
    )
    return model, rng


def fp32_nodes(model: onnx.ModelProto) -> set[str]:
    """Nodes whose float inputs are all FP32 after conversion (inferred types)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    return {
        node.name
        for node in model.graph.node
        if node.op_type != "Cast" and all(types.get(i) == TensorProto.FLOAT for i in node.input if i)
    }


def test_convert_with_gate_keeps_the_ops_over_the_limit(tmp_path):
    model, rng = big_then_small()
    xs = [rng.uniform(-20.0, 20.0, size=(6, 4)).astype(np.float32) for _ in range(FP16_STAT_SAMPLES)]
    xs[3][2, 1] = -20.0  # |up| reaches exactly 20,000 on calibration data
    asked = []

    def feeds(count):
        asked.append(count)
        return [{"x": x} for x in xs[:count]]

    evaluated = []

    def evaluate(converted):
        evaluated.append(converted)
        return Verdict(passed=True, overall={})

    messages, timings = [], {}
    result = convert_with_gate(
        {"decoder": model}, {"decoder": feeds}, SimpleNamespace(fallback=True), evaluate, messages.append, timings
    )
    assert asked == [FP16_STAT_SAMPLES]
    assert result["fp16_blocked"] == ["decoder:scale_up", "decoder:scale_down"]
    assert messages == ["decoder: 2 ops write or read |activation| > 16,000 on calibration data: FP32"]
    assert len(evaluated) == 1 and result["attempts"] == [{"op_block_list": [], "overall": {}, "passed": True}]
    assert timings["statistics_s"] > 0

    converted = evaluated[0]["decoder"]
    kept = fp32_nodes(converted)
    assert "scale_up" in kept and "scale_down" in kept and "mm" not in kept
    dtypes = {init.name: init.data_type for init in converted.graph.initializer}
    assert dtypes["w"] == TensorProto.FLOAT16
    assert dtypes["thousand"] == TensorProto.FLOAT and dtypes["milli"] == TensorProto.FLOAT  # the kept ops' weights
    assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [TensorProto.FLOAT]  # FP32 I/O kept
    x = np.full((1, 4), 19.0, np.float32)
    (want,), (got,) = run(model, {"x": x}, ["y"]), run(converted, {"x": x}, ["y"])
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT  # the caller's graph is not converted in place


def test_a_failing_gate_also_keeps_the_delicate_ops():
    model, rng = big_then_small()
    xs = [rng.uniform(-20.0, 20.0, size=(6, 4)).astype(np.float32) for _ in range(2)]
    evaluated = []

    def evaluate(converted):
        evaluated.append(converted["decoder"])
        return Verdict(passed=len(evaluated) == 2, overall={"attempt": len(evaluated)})

    def feeds(count):
        return [{"x": x} for x in xs]

    options = SimpleNamespace(fallback=True)
    result = convert_with_gate({"decoder": model}, {"decoder": feeds}, options, evaluate, lambda m: None, {})
    assert [a["op_block_list"] for a in result["attempts"]] == [[], DELICATE_OPS]
    assert [a["passed"] for a in result["attempts"]] == [False, True] and result["fidelity"].passed
    assert "Softmax" in DELICATE_OPS
    assert "softmax" not in fp32_nodes(evaluated[0]) and "softmax" in fp32_nodes(evaluated[1])
    assert "mm" not in fp32_nodes(evaluated[1])

    evaluated.clear()
    options.fallback = False
    result = convert_with_gate({"decoder": model}, {"decoder": feeds}, options, evaluate, lambda m: None, {})
    assert len(result["attempts"]) == 1 and not result["fidelity"].passed


def test_a_kept_chain_carries_values_over_the_fp16_range_in_fp32():
    """x·100,000 → ·0.00001: the intermediate (up to 2,000,000) is far over FP16's 65,504. Both ops are kept FP32 by
    the activation rule; the converter alone still routes the tensor between them through FP16 (inf)."""
    rng = np.random.default_rng(0)
    model = make_model(
        [
            helper.make_node("Mul", ["x", "big"], ["up"], name="scale_up"),
            helper.make_node("Mul", ["up", "small"], ["down"], name="scale_down"),
            helper.make_node("MatMul", ["down", "w"], ["y"], name="mm"),
        ],
        [float_input("x", ["rows", 4])],
        ["y"],
        {
            "big": np.array(1e5, np.float32),
            "small": np.array(1e-5, np.float32),
            "w": rng.normal(size=(4, 3)).astype(np.float32),
        },
    )
    x = rng.uniform(-20.0, 20.0, size=(6, 4)).astype(np.float32)
    absmax = {"x": 20.0, "up": 2e6, "down": 20.0, "y": 100.0}
    kept = nodes_over_limit(model, absmax)
    assert kept == ["scale_up", "scale_down"]
    converted = convert_fp16(copy.deepcopy(model), kept)
    assert "mm" not in fp32_nodes(converted) and {"scale_up", "scale_down"} <= fp32_nodes(converted)
    (want,), (got,) = run(model, {"x": x}, ["y"]), run(converted, {"x": x}, ["y"])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    plain = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True, node_block_list=kept)
    (overflowed,) = run(plain, {"x": x}, ["y"])
    assert not np.isfinite(overflowed).all()  # what the converter alone does with the same keep-list
