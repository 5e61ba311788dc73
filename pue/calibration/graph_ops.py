"""What a graph's weight-bearing ops are, and how their FLOPs split between int8 and float."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

WEIGHT_OP_TYPES = ("MatMul", "Gemm", "Conv")


@dataclass
class WeightOp:
    """A MatMul/Gemm/Conv whose second input is a weight initializer (never activation×activation)."""

    graph: str  # "vision" or "decoder"
    node: str
    op_type: str
    activation: str  # the input tensor that gets quantized (or smoothed)
    weight: str
    weight_shape: tuple[int, ...]
    flops_per_token: int  # 2·K·N for MatMul/Gemm; 2·C·kh·kw·O for a patch Conv (per output position)

    @property
    def in_channels(self) -> int:
        return int(self.weight_shape[1] if self.op_type == "Conv" else self.weight_shape[0])


def weight_ops(model: Any, graph_name: str) -> list[WeightOp]:
    """Weight-bearing ops in graph order. Attention's QKᵀ and softmax×V have no initializer and are skipped."""
    initializers = {init.name: init for init in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OP_TYPES or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        shape = tuple(int(d) for d in initializers[node.input[1]].dims)
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            shape = shape[::-1] if trans_b else shape
        if node.op_type == "Conv":
            flops = 2 * int(np.prod(shape))
        elif len(shape) == 2:
            flops = 2 * shape[0] * shape[1]
        else:
            continue
        out.append(WeightOp(graph_name, node.name, node.op_type, node.input[0], node.input[1], shape, flops))
    return out


def int8_flop_share(ops: list[WeightOp], float_nodes: set[str], tokens: dict[str, int]) -> float:
    """Share of weight-op FLOPs that run in int8, each graph weighted by its tokens per patch.

    `tokens` maps graph name to how many rows a weight op of that graph multiplies per patch (vision: crops ×
    patch tokens; decoder: the image prompt's length); Conv counts per output position like a MatMul per token.
    """
    total = sum(op.flops_per_token * tokens[op.graph] for op in ops)
    kept = sum(op.flops_per_token * tokens[op.graph] for op in ops if op.node not in float_nodes)
    return float(kept / total) if total else 0.0
