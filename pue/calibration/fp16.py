"""FP16 graphs with onnxruntime's converter: FP16 weights and compute, FP32 inputs and outputs.

Ops that write or read a tensor whose calibrated |activation| exceeds 16,000 stay FP32 (FP16's max is 65,504; the
margin covers inputs the calibration did not see). Readers count too: the converter hands an FP16 op its FP32 input
through a Cast, which turns a value over 65,504 into inf (measured: `llava gains-few --outlier-gain 1000`, whose MLP
product reaches the millions, failed its FP16 gate at mean cosine 0.06 while only the writers were kept); and between
two kept ops the tensor stays FP32 (`drop_fp16_round_trips`). onnxruntime on CPU computes FP16 ops in FP32, so a
CPU-measured gate cannot reveal FP16 overflow: that is what the activation rule is for, and reports say where the
gate ran.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

FP16_SAFE_LIMIT = 16_000.0
FP16_STAT_SAMPLES = 16
# Kept in FP32 when the gate fails with the activation rule alone (numerically delicate reductions).
DELICATE_OPS = ["Softmax", "ReduceMean", "ReduceL2", "Pow", "Sqrt", "Div", "CumSum"]


def nodes_over_limit(model: Any, absmax: dict[str, float], limit: float = FP16_SAFE_LIMIT) -> list[str]:
    """The nodes that write or read a tensor over `limit` (a graph input or initializer over it counts too)."""
    return [
        node.name
        for node in model.graph.node
        if any(absmax.get(t, 0.0) > limit for t in [*node.output, *node.input] if t)
    ]


def convert_fp16(model: Any, node_block_list: list[str], op_block_list: list[str] | None = None) -> Any:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    ops = list(DEFAULT_OP_BLOCK_LIST) + list(op_block_list or [])
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        node_block_list=node_block_list,
        op_block_list=ops,
        disable_shape_infer=False,
    )
    return drop_fp16_round_trips(converted)


def drop_fp16_round_trips(model: Any) -> Any:
    """Between two FP32 ops the converter still routes the tensor through FP16 (a Cast to FP16 after every kept op,
    a Cast back to FP32 before every kept op), so a kept chain overflows on values over 65,504 all the same
    (measured: the RMSNorms of `llava gains-few --outlier-gain 1000`, whose squares reach 4e6, gave inf and a gate
    at mean cosine 0.06). Readers of such a Cast FP16→FP32 pair read the FP32 tensor itself; Casts left unread go."""
    from onnx import TensorProto

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    declared = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}

    def is_fp32(name: str) -> bool:
        """A graph input, a value_info or output declared FP32, or a Cast to FP32's output."""
        if name in declared:
            return declared[name] == TensorProto.FLOAT
        node = producer.get(name)
        return node is not None and cast_to(node) == TensorProto.FLOAT

    fp32_source: dict[str, str] = {}  # output of Cast(FP16→FP32) → the FP32 tensor before its Cast(FP32→FP16)
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is not None and cast_to(first) == TensorProto.FLOAT16 and is_fp32(first.input[0]):
            fp32_source[node.output[0]] = first.input[0]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in fp32_source:
                node.input[index] = fp32_source[name]
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        unread = [n for n in graph.node if n.op_type == "Cast" and not any(o in read for o in n.output)]
        if not unread:
            return model
        for node in unread:
            graph.node.remove(node)


def convert_with_gate(
    models: dict[str, Any],
    feeds: dict[str, Callable[..., Any]],
    options: Any,
    evaluate: Callable[[dict[str, Any]], Any],
    say: Callable[[str], None],
    timings: dict[str, float],
) -> dict[str, Any]:
    """FP16 graphs with the >16,000 rule; delicate reductions also kept FP32 if the gate fails."""
    from pue.calibration.stats import collect_tensor_absmax

    started = time.perf_counter()
    blocked: dict[str, list[str]] = {}
    for name, model in models.items():
        absmax = collect_tensor_absmax(model, feeds[name](FP16_STAT_SAMPLES))
        blocked[name] = nodes_over_limit(model, absmax)
        say(f"{name}: {len(blocked[name])} ops write or read |activation| > 16,000 on calibration data: FP32")
    timings["statistics_s"] = time.perf_counter() - started
    attempts = []
    for extra_ops in ([], DELICATE_OPS):
        converted = {
            name: convert_fp16(copy.deepcopy(model), blocked[name], extra_ops) for name, model in models.items()
        }
        fidelity = evaluate(converted)
        attempts.append({"op_block_list": extra_ops, "overall": fidelity.overall, "passed": fidelity.passed})
        if fidelity.passed or not options.fallback:
            break
    return {
        "fidelity": fidelity,
        "attempts": attempts,
        "fp16_blocked": [f"{g}:{n}" for g, names in blocked.items() for n in names],
    }
