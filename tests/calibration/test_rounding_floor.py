"""The parent's bf16 rounding floor (`pue.calibration.rounding_floor`): the rounded graph computes what bf16 kernels
compute (operands rounded to nearest even, f32 accumulation), and a failed INT8 gate says which side the error is on."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pue.calibration.rounding_floor import bf16_rounded, floor_reason, measure_floor
from pue.fidelity import FidelityThresholds, measure_fidelity


def to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), back in float32."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def two_readers_graph(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """x feeds two MatMuls with the same weight (tied); their product goes through a Gemm with a bias."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
        helper.make_node("MatMul", ["x", "w"], ["b"], name="second"),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Gemm", ["s", "w", "bias"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[0]])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_rounded_graph_computes_bf16_operands_with_f32_accumulation():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 16)).astype(np.float32)
    bias = rng.normal(size=16).astype(np.float32)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    model = two_readers_graph(weight, bias)
    rounded = bf16_rounded(model)
    onnx.checker.check_model(rounded)
    casts = [node for node in rounded.graph.node if node.op_type == "Cast"]
    # one Cast pair per rounded tensor (x, w, s), however many nodes read it; the bias is not rounded
    assert len(casts) == 6
    assert not any(node.input[0] == "bias" for node in casts)
    assert [node.name for node in model.graph.node] == ["first", "second", "add", "gemm"]  # the parent untouched

    xb, wb = to_bf16(x), to_bf16(weight)
    s = (xb @ wb) * 2
    expected = to_bf16(s) @ wb.T + bias
    np.testing.assert_allclose(run(rounded, x), expected, rtol=1e-5, atol=1e-5)
    # and it is not the float graph's answer: the rounding is really there
    assert np.abs(run(model, x) - expected).max() > 1e-3
    same = bf16_rounded(model, in_place=True)  # what the quantizer does with a graph it loaded for this alone
    assert same is model and len([n for n in model.graph.node if n.op_type == "Cast"]) == 6


def gate(cosines: list[float]):
    """A gate report whose items have these cosines to the parent (orthogonal rows, each bent off its own axis)."""
    count = len(cosines)
    rows = np.eye(count, 2 * count, dtype=np.float32)
    parent = {"images": rows}
    bent = rows.copy()
    for i, c in enumerate(cosines):
        bent[i] = c * rows[i] + np.sqrt(1 - c * c) * np.roll(rows[i], count)
    return measure_fidelity({"images": bent}, parent, FidelityThresholds())


def test_the_floor_says_whose_error_a_failed_gate_is(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "g.onnx"
    onnx.save(two_readers_graph(rng.normal(size=(8, 8)).astype(np.float32), np.zeros(8, np.float32)), path)
    seen: list[dict] = []
    said: list[str] = []

    def evaluate(graphs):
        seen.append(graphs)
        return gate([0.9999, 0.9998, 0.9999])

    record = measure_floor({"decoder": path}, evaluate, said.append)
    assert [n.op_type for n in seen[0]["decoder"].graph.node].count("Cast") == 6  # the rounded parent was measured
    assert record["passed"] and record["overall"]["count"] == 3
    assert "passes the gate" in said[0]
    assert "the error is the quantizer's" in floor_reason(record)

    assert record["verdict"] == "clear" and record["headroom"] > 0.9  # min 0.9998: 99 % of 0.02 left

    record = measure_floor({"decoder": path}, lambda graphs: gate([0.9999, 0.91, 0.9999]), said.append)
    assert not record["passed"] and abs(record["overall"]["min_cosine"] - 0.91) < 1e-6
    assert record["verdict"] == "fails" and "FAILS the gate" in said[1]
    reason = floor_reason(record)
    assert "the parent itself fails this gate in bf16 arithmetic" in reason and "0.9100" in reason

    # passes, but bf16 alone spends most of the minimum's allowance (0.985 against 0.98: a quarter left)
    record = measure_floor({"decoder": path}, lambda graphs: gate([1.0] * 9 + [0.985]), said.append)
    assert record["passed"] and record["verdict"] == "tight" and abs(record["headroom"] - 0.25) < 1e-3
    assert "only just" in said[2] and "25% of its allowance left" in said[2]
    assert "little room" in floor_reason(record) and "int8-dynamic" in floor_reason(record)
