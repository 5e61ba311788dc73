"""Per-token dynamic INT8 for onnxruntime on CPU, in standard ONNX ops (issue 14, item 3).

onnxruntime's dynamic MatMul (`DynamicQuantizeLinear` → `MatMulInteger`) computes one activation scale per tensor
per run: a massive token (1000× the others, as trained LLMs write at their first token or delimiters) sets the step
for every other token of the batch, whose inputs then round to a few levels, and an item's embedding depends on the
other rows of its batch. Here each row of the last axis gets its own symmetric scale:

    s = max|x_row| / 127            q = round(x / s) + 128  (uint8, zero point 128 for every row)
    y = float(MatMulInteger(q, W_q, 128)) · s · s_w

The zero point is the same scalar for every row, so the int32 product is onnxruntime's ordinary u8×s8
`MatMulInteger`; the per-row scale only multiplies its result. Weights are per-output-channel symmetric int8 within
±`weight_qmax` (7 bits on the u8×s8 flavours: `pue.precisions`), so the pair sums of CPUs without VNNI cannot
saturate (|q − 128| ≤ 127, 2·255·64 < 32,767).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from pue.calibration.graph_ops import WeightOp

PREFIX = "pue_token_"
TOKEN_OUTLIER_RATIO = 20.0  # a token's max |x| over the median token's: above it, per-tensor steps starve the rest


def quantize_per_token(model: Any, ops: list[WeightOp], weight_qmax: int) -> list[str]:
    """Rewrite each MatMul of `ops` (float weight initializer) in place as per-token dynamic INT8; returns the
    rewritten node names."""
    initializers = {init.name: init for init in model.graph.initializer}
    done = []
    for index, op in enumerate(ops):
        position, node = next((i, n) for i, n in enumerate(model.graph.node) if n.name == op.node)
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        if weight.ndim != 2:
            continue
        scale = np.abs(weight).max(axis=0) / float(weight_qmax)
        scale[scale == 0] = 1.0
        quantized = np.clip(np.round(weight / scale), -weight_qmax, weight_qmax).astype(np.int8)
        tag = f"{PREFIX}{index}"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, f"{tag}_w"),
                numpy_helper.from_array(scale.astype(np.float32), f"{tag}_w_scale"),
                numpy_helper.from_array(np.array(128, np.uint8), f"{tag}_zp"),
                numpy_helper.from_array(np.array(128.0, np.float32), f"{tag}_zp_f"),
                numpy_helper.from_array(np.array(127.0, np.float32), f"{tag}_levels"),
                numpy_helper.from_array(np.array(1e-30, np.float32), f"{tag}_tiny"),
                numpy_helper.from_array(np.array(0.0, np.float32), f"{tag}_lo"),
                numpy_helper.from_array(np.array(255.0, np.float32), f"{tag}_hi"),
            ]
        )
        source, output = node.input[0], node.output[0]

        def make(op_type: str, inputs: list[str], name: str, tag: str = tag, **attrs: Any) -> Any:
            return helper.make_node(op_type, inputs, [f"{tag}_{name}"], name=f"{tag}_{name}", **attrs)

        nodes = [
            make("Abs", [source], "abs"),
            make("ReduceMax", [f"{tag}_abs"], "absmax", axes=[-1], keepdims=1),
            make("Max", [f"{tag}_absmax", f"{tag}_tiny"], "range"),
            make("Div", [f"{tag}_range", f"{tag}_levels"], "scale"),
            make("Div", [source, f"{tag}_scale"], "scaled"),
            make("Round", [f"{tag}_scaled"], "rounded"),
            make("Add", [f"{tag}_rounded", f"{tag}_zp_f"], "shifted"),
            make("Clip", [f"{tag}_shifted", f"{tag}_lo", f"{tag}_hi"], "clipped"),
            make("Cast", [f"{tag}_clipped"], "q", to=TensorProto.UINT8),
            make("MatMulInteger", [f"{tag}_q", f"{tag}_w", f"{tag}_zp"], "acc"),
            make("Cast", [f"{tag}_acc"], "acc_f", to=TensorProto.FLOAT),
            make("Mul", [f"{tag}_acc_f", f"{tag}_scale"], "rows"),
            helper.make_node("Mul", [f"{tag}_rows", f"{tag}_w_scale"], [output], name=f"{tag}_out"),
        ]
        model.graph.node.remove(node)
        for offset, new in enumerate(nodes):
            model.graph.node.insert(position + offset, new)
        done.append(op.node)
    _drop_unused(model)
    return done


def _drop_unused(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


__all__ = ["TOKEN_OUTLIER_RATIO", "quantize_per_token"]
