"""Small hand-built ONNX graphs for unit tests of the quantization math, and a way to run them."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10  # onnxruntime 1.2x/1.3x read it


def float_input(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[str],
    initializers: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """A float graph; outputs are declared by name only (type and shape left to onnxruntime)."""
    graph = helper.make_graph(
        nodes,
        "test",
        inputs,
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run on the CPU with graph optimizations off (the ops as written, Q/DQ included); `outputs` may name
    intermediate tensors."""
    import onnxruntime as ort

    declared = {o.name for o in model.graph.output}
    if any(name not in declared for name in outputs or []):
        model = copy.deepcopy(model)
        for name in outputs or []:
            if name not in declared:
                model.graph.output.add(name=name)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feed)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def node_by_name(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def gemm_then_reshape(rows: int, k: int, n: int, bias: float = 0.1) -> onnx.ModelProto:
    """x (b, rows, k) → Reshape (b·rows, k) → Gemm (transB, n outputs) "fc" → Reshape (b, rows, n) with the leading
    dimension read from x's shape, as Qwen3-VL's patch merger does; a MatMul "mm" on x feeds a second output."""
    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(n, k)) * (1 + 3 * rng.random((n, 1)))).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("Gemm", ["x2", "W", "b"], ["y"], transB=1, name="fc"),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "tail"], ["shape"], axis=0),
        helper.make_node("Reshape", ["y", "shape"], ["out"]),
        helper.make_node("MatMul", ["x", "V"], ["side"], name="mm"),
    ]
    inits = {
        "W": weight,
        "b": rng.normal(size=n).astype(np.float32) * bias,
        "V": rng.normal(size=(k, 8)).astype(np.float32),
        "flat": np.array([-1, k], np.int64),
        "zero": np.array(0, np.int64),
        "axes": np.array([0], np.int64),
        "tail": np.array([rows, n], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "gemm_then_reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", rows, k])],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", rows, n]),
            helper.make_tensor_value_info("side", TensorProto.FLOAT, ["b", rows, 8]),
        ],
        [numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
