"""FP16 graphs with onnxruntime's converter: FP16 weights and compute, FP32 inputs and outputs.

Ops whose calibrated |activation| exceeds 16,000 stay FP32 (FP16's max is 65,504; the margin covers inputs the
calibration did not see). onnxruntime on CPU computes FP16 ops in FP32, so a CPU-measured gate cannot reveal
FP16 overflow: that is what the activation rule is for, and reports say where the gate ran.
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
    return [node.name for node in model.graph.node if any(absmax.get(o, 0.0) > limit for o in node.output)]


def convert_fp16(model: Any, node_block_list: list[str], op_block_list: list[str] | None = None) -> Any:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    ops = list(DEFAULT_OP_BLOCK_LIST) + list(op_block_list or [])
    return convert_float_to_float16(
        model,
        keep_io_types=True,
        node_block_list=node_block_list,
        op_block_list=ops,
        disable_shape_infer=False,
    )


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
        say(f"{name}: {len(blocked[name])} ops exceed |16,000| on calibration data and stay FP32")
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
