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
