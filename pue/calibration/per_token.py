"""Per-token dynamic INT8 for onnxruntime on CPU, in standard ONNX ops (issue 14, item 3).

onnxruntime's dynamic MatMul (`DynamicQuantizeLinear` → `MatMulInteger`) computes one activation scale per tensor
per run: a massive token (1000× the others, as trained LLMs write at their first token or delimiters) sets the step
for every other token of the batch, whose inputs then round to a few levels, and an item's embedding depends on the
other rows of its batch. Here each row of the last axis gets its own asymmetric range, as onnxruntime's
`DynamicQuantizeLinear` gives a whole tensor (a row after GELU or SiLU·up is mostly on one side of zero, so the
255 levels cover its own range rather than ±max):

    s = (max(x_row, 0) − min(x_row, 0)) / 255       z = round(−min(x_row, 0) / s)       q = round(x / s) + z
    y = (float(MatMulInteger(q, W_q + 128, ∅, 128)) − z · Σ_k W_q) · s · s_w

The kernel's zero points are scalars (none for q, 128 for the weights), so the int32 product is onnxruntime's
ordinary integer kernel; each row's zero point comes off afterwards with the weights' column sums, and the per-row
scale multiplies the result. Weights are per-output-channel symmetric with the full 8 bits (±127), stored
as uint8 around 128: the u8×u8 kernel widens to 16 bits before it multiplies, so it is exact on every CPU, where the
u8×s8 kernel of CPUs without VNNI sums pairs of products in int16 and saturates on full-range weights (which is why
onnxruntime's own dynamic MatMul keeps 7-bit weights: `pue.precisions`). Measured on an AVX2 CPU (512×1024×1024,
2 threads): u8×s8 full range wrong by up to 169,846 in int32, u8×u8 exact at 0.86× its speed, s8×s8 exact at 0.16×.
The 8th bit is what a model whose outlier channels make its errors compound needs (issue 14: `llava_next
gains-few`, every op per token, simulated: min cosine 0.976 with 7-bit weights, 0.992 with 8-bit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from pue.calibration.graph_ops import WeightOp
from pue.calibration.weight_storage import WEIGHT_QMAX, drop_unread_initializers

PREFIX = "pue_token_"
TOKEN_OUTLIER_RATIO = 20.0  # a token's max |x| over the median token's: above it, per-tensor steps starve the rest


def quantize_per_token(
    model: Any, ops: list[WeightOp], moment_of: Callable[[str], np.ndarray | None] | None = None
) -> list[str]:
    """Rewrite each MatMul of `ops` (float weight initializer) in place as per-token dynamic INT8; returns the
    rewritten node names. `moment_of(node)`: the second moment of the op's input on calibration tokens, for GPTQ
    rounding (None, or a None moment: round to nearest)."""
    initializers = {init.name: init for init in model.graph.initializer}
    done = []
    for index, op in enumerate(ops):
        position, node = next((i, n) for i, n in enumerate(model.graph.node) if n.name == op.node)
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        if weight.ndim != 2:
            continue
        scale = np.abs(weight).max(axis=0) / float(WEIGHT_QMAX)
        scale[scale == 0] = 1.0
        moment = moment_of(op.node) if moment_of is not None else None
        if moment is not None:
            from pue.calibration.gptq import gptq_levels

            levels = gptq_levels(weight, scale, moment, WEIGHT_QMAX)
        else:
            levels = np.clip(np.round(weight / scale), -WEIGHT_QMAX, WEIGHT_QMAX)
        quantized = (levels + 128).astype(np.uint8)
        tag = f"{PREFIX}{index}"
        column_sums = (quantized.astype(np.int64) - 128).sum(axis=0).astype(np.float32)
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, f"{tag}_w"),
                numpy_helper.from_array(scale.astype(np.float32), f"{tag}_w_scale"),
                numpy_helper.from_array(column_sums, f"{tag}_w_sums"),
                numpy_helper.from_array(np.array(128, np.uint8), f"{tag}_w_zp"),
                numpy_helper.from_array(np.array(255.0, np.float32), f"{tag}_levels"),
                numpy_helper.from_array(np.array(1e-30, np.float32), f"{tag}_tiny"),
                numpy_helper.from_array(np.array(0.0, np.float32), f"{tag}_zero"),
            ]
        )
        source, output = node.input[0], node.output[0]

        def make(op_type: str, inputs: list[str], name: str, tag: str = tag, **attrs: Any) -> Any:
            return helper.make_node(op_type, inputs, [f"{tag}_{name}"], name=f"{tag}_{name}", **attrs)

        nodes = [
            make("ReduceMin", [source], "row_min", axes=[-1], keepdims=1),
            make("ReduceMax", [source], "row_max", axes=[-1], keepdims=1),
            make("Min", [f"{tag}_row_min", f"{tag}_zero"], "lo"),
            make("Max", [f"{tag}_row_max", f"{tag}_zero"], "hi"),
            make("Sub", [f"{tag}_hi", f"{tag}_lo"], "span"),
            make("Div", [f"{tag}_span", f"{tag}_levels"], "raw_scale"),
            make("Max", [f"{tag}_raw_scale", f"{tag}_tiny"], "scale"),
            make("Div", [f"{tag}_lo", f"{tag}_scale"], "lo_steps"),
            make("Neg", [f"{tag}_lo_steps"], "zp_raw"),
            make("Round", [f"{tag}_zp_raw"], "zp"),
            make("Div", [source, f"{tag}_scale"], "scaled"),
            make("Round", [f"{tag}_scaled"], "rounded"),
            make("Add", [f"{tag}_rounded", f"{tag}_zp"], "shifted"),
            make("Clip", [f"{tag}_shifted", f"{tag}_zero", f"{tag}_levels"], "clipped"),
            make("Cast", [f"{tag}_clipped"], "q", to=TensorProto.UINT8),
            make("MatMulInteger", [f"{tag}_q", f"{tag}_w", "", f"{tag}_w_zp"], "acc"),
            make("Cast", [f"{tag}_acc"], "acc_f", to=TensorProto.FLOAT),
            make("Mul", [f"{tag}_zp", f"{tag}_w_sums"], "zp_part"),
            make("Sub", [f"{tag}_acc_f", f"{tag}_zp_part"], "centred"),
            make("Mul", [f"{tag}_centred", f"{tag}_scale"], "rows"),
            helper.make_node("Mul", [f"{tag}_rows", f"{tag}_w_scale"], [output], name=f"{tag}_out"),
        ]
        model.graph.node.remove(node)
        for offset, new in enumerate(nodes):
            model.graph.node.insert(position + offset, new)
        done.append(op.node)
    drop_unread_initializers(model)
    return done


__all__ = ["TOKEN_OUTLIER_RATIO", "WEIGHT_QMAX", "quantize_per_token"]
