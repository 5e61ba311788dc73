"""Simulated INT8 in a float graph: Q/DQ of chosen weight ops' inputs and weights, in standard ONNX ops.

A candidate quantization (which ops, which activation ranges, per-tensor or per-token) is measured end to end in a
few seconds, without running onnxruntime's quantizer: each chosen op's activation goes through
QuantizeLinear→DequantizeLinear with a given range (static), DynamicQuantizeLinear→DequantizeLinear (dynamic, one
range per tensor per run, as onnxruntime's dynamic MatMul), or per-row min/max arithmetic (dynamic per token), and
its weight is replaced by its per-output-channel int8 quantize→dequantize. onnxruntime computes these Q/DQ pairs in
float, which is TensorRT's arithmetic and onnxruntime's u8×s8 arithmetic with 7-bit weights (no saturation).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from pue.calibration.graph_ops import WeightOp
from pue.calibration.simulate import qdq_weight

PREFIX = "pue_fq_"
GRANULARITIES = ("static", "dynamic", "token")


@dataclass(frozen=True)
class ActivationQuant:
    """How one activation tensor is quantized: `static` over [lo, hi] (`scheme` u8 or s8), `dynamic` per tensor per
    run, or `token` (per row of the last axis, per run)."""

    granularity: str
    scheme: str = "u8"
    lo: float = 0.0
    hi: float = 0.0


def fake_quantize(
    model: Any,
    ops: list[WeightOp],
    plans: dict[str, ActivationQuant],
    weight_qmax: int,
    base_dir: Path | None = None,
) -> Any:
    """A copy of `model` whose `ops` read simulated-int8 inputs (per `plans[op.activation]`) and int8 weights.

    `base_dir`: `model` was loaded without its external data (`onnx.load(path, load_external_data=False)`), which
    lies there; the copy holds every weight inline, each set once. protobuf keeps a replaced field's old bytes until
    the whole message is freed (measured: replacing the MatMul weights of a loaded 785 MB decoder in place took it
    from 0.81 to 1.61 GB), so a copy of a loaded graph whose weights are then replaced holds them twice, beside the
    loaded graph; from the weightless model, the copy holds them once and no loaded graph is needed."""
    out = copy.deepcopy(model)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes_by_name = {node.name: node for node in graph.node}
    readers = Counter(name for node in graph.node for name in node.input)
    replaced: dict[str, str] = {}
    new_nodes: list[tuple[str, list[Any]]] = []  # (insert before this node, nodes)
    for index, op in enumerate(ops):
        node = nodes_by_name[op.node]
        if op.op_type != "MatMul":
            continue  # Conv/Gemm: left float in the simulation (the patch embedding; none in the decoders)
        if op.activation not in replaced:
            plan = plans[op.activation]
            tag = f"{PREFIX}{len(replaced)}"
            replaced[op.activation] = f"{tag}_out"
            new_nodes.append((op.node, _activation_nodes(graph, op.activation, tag, plan)))
        node.input[0] = replaced[op.activation]
        float_weight = numpy_helper.to_array(initializers[op.weight], base_dir=str(base_dir or ""))
        weight = qdq_weight(float_weight.astype(np.float32), weight_qmax)
        if readers[op.weight] == 1 and base_dir is not None:  # still weightless here: its data is set once
            _set_inline(initializers[op.weight], weight.astype(np.float32))
        elif readers[op.weight] == 1:  # replaced in place: the copy holds no float value for it
            initializers[op.weight].CopyFrom(numpy_helper.from_array(weight.astype(np.float32), op.weight))
        else:  # a weight other nodes also read (tied) keeps its float value for them
            name = f"{PREFIX}w{index}"
            graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), name))
            node.input[1] = name
    for before, extra in new_nodes:
        position = next(i for i, n in enumerate(graph.node) if n.name == before)
        for offset, node in enumerate(extra):
            graph.node.insert(position + offset, node)
    if base_dir is not None:  # the weights no op quantizes, read once from their files
        load_external_data_for_model(out, str(base_dir))
    return out


def _set_inline(tensor: Any, values: np.ndarray) -> None:
    """Give a weightless (external-data) initializer `values` inline, in its own dtype and shape."""
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = values.astype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).tobytes()


def _constant(graph: Any, name: str, value: Any, dtype: Any = np.float32) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def _activation_nodes(graph: Any, source: str, tag: str, plan: ActivationQuant) -> list[Any]:
    out = f"{tag}_out"
    if plan.granularity == "static":
        if plan.scheme == "s8":
            scale = max(abs(plan.lo), abs(plan.hi)) / 127.0 or 1.0
            zero = _constant(graph, f"{tag}_zp", 0, np.int8)
        else:
            lo, hi = min(plan.lo, 0.0), max(plan.hi, 0.0)
            scale = (hi - lo) / 255.0 or 1.0
            zero = _constant(graph, f"{tag}_zp", int(np.clip(np.round(-lo / scale), 0, 255)), np.uint8)
        s = _constant(graph, f"{tag}_scale", scale)
        return [
            helper.make_node("QuantizeLinear", [source, s, zero], [f"{tag}_q"], name=f"{tag}_Q"),
            helper.make_node("DequantizeLinear", [f"{tag}_q", s, zero], [out], name=f"{tag}_DQ"),
        ]
    if plan.granularity == "dynamic":
        return [
            helper.make_node(
                "DynamicQuantizeLinear", [source], [f"{tag}_q", f"{tag}_s", f"{tag}_z"], name=f"{tag}_DynQ"
            ),
            helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [out], name=f"{tag}_DQ"),
        ]
    # per token: uint8 asymmetric over each row's own [min(x, 0), max(x, 0)]
    zero = _constant(graph, f"{tag}_zero", 0.0)
    eps = _constant(graph, f"{tag}_eps", 1e-12)
    levels = _constant(graph, f"{tag}_levels", 255.0)
    top = _constant(graph, f"{tag}_top", 255.0)

    def n(op: str, inputs: list[str], name: str, **attrs: Any) -> Any:
        return helper.make_node(op, inputs, [f"{tag}_{name}"], name=f"{tag}_{name}", **attrs)

    return [
        n("ReduceMin", [source], "rmin", axes=[-1], keepdims=1),
        n("ReduceMax", [source], "rmax", axes=[-1], keepdims=1),
        n("Min", [f"{tag}_rmin", zero], "lo"),
        n("Max", [f"{tag}_rmax", zero], "hi"),
        n("Sub", [f"{tag}_hi", f"{tag}_lo"], "span"),
        n("Div", [f"{tag}_span", levels], "raw_scale"),
        n("Max", [f"{tag}_raw_scale", eps], "scale"),
        n("Div", [f"{tag}_lo", f"{tag}_scale"], "neg_zp"),
        n("Neg", [f"{tag}_neg_zp"], "zp_raw"),
        n("Round", [f"{tag}_zp_raw"], "zp"),
        n("Div", [source, f"{tag}_scale"], "scaled"),
        n("Round", [f"{tag}_scaled"], "rounded"),
        n("Add", [f"{tag}_rounded", f"{tag}_zp"], "shifted"),
        n("Clip", [f"{tag}_shifted", zero, top], "q"),
        n("Sub", [f"{tag}_q", f"{tag}_zp"], "centred"),
        helper.make_node("Mul", [f"{tag}_centred", f"{tag}_scale"], [out], name=f"{tag}_DQ"),
    ]


def float_session(model: Any) -> Any:
    """An onnxruntime CPU session that keeps Q/DQ arithmetic in float (no QDQ → int8 kernel fusion)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


__all__ = ["GRANULARITIES", "ActivationQuant", "fake_quantize", "float_session"]
