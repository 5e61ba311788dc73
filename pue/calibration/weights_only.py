"""INT8 weights alone, for OpenVINO's run-time activation quantization (`--precision int8-dynamic --target openvino`).

Each chosen MatMul or Gemm reads its weight through `DequantizeLinear(int8 levels, per-output-channel scale, 0)`
and its activation as it is. OpenVINO's CPU plugin compiles such an op into a `FullyConnectedCompressed` and, with
`DYNAMIC_QUANTIZATION_GROUP_SIZE` set (`pue.precisions.OPENVINO_GROUP_SIZE`), quantizes its input per token and per
group of input channels at run time, then runs int8 dot products (VNNI, AMX); on a CPU without them it computes the
weights in float. A static range starves every other token where one token is massive, or every other channel where
norm gains amplify a few; a per-token, per-group step does not (measured: `llava_next gains-few` seed 2, plain 8-bit
weights with OpenVINO's groups of 32: held-out min cosine 0.987, where pue's static Q/DQ search for OpenVINO ends
at 0.936; BENCHMARKS.md "OpenVINO's run-time INT8").

The levels and scales are named as onnxruntime's quantizer names them (`{weight}_quantized`, `{weight}_scale`,
`{weight}_zero_point`), so GPTQ (`pue.calibration.gptq.round_weights`) re-rounds them on the same grid. Full 8-bit
symmetric levels: OpenVINO chooses the kernels that multiply them (no u8×s8 pair sums of pue's own choosing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

__all__ = ["quantize_weights_only", "weights_only_graph"]

WEIGHT_QMAX = 127


def weights_only_graph(model_path: Path, output_path: Path, nodes: list[str]) -> list[str]:
    """The float graph at `model_path` with `nodes`' weights int8 (`quantize_weights_only`), written to
    `output_path` (inline below the protobuf limit, else with one external data file). Returns the nodes rewritten."""
    import onnx

    from pue.graph_files import save_graph

    model = onnx.load(str(model_path))
    done = quantize_weights_only(model, nodes)
    save_graph(model, output_path)
    return done


def quantize_weights_only(model: Any, nodes: list[str], base_dir: str = "") -> list[str]:
    """Rewrite `model` in place: each MatMul or Gemm named in `nodes` whose weight is a 2-D initializer reads it as
    per-output-channel symmetric int8 through a DequantizeLinear. Returns the nodes rewritten, in graph order (a Conv,
    or a weight of another rank, is left float; the caller counts it so). `base_dir`: where the model's external
    data lies, if it was loaded without it."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    wanted = set(nodes)
    levels_of: dict[tuple[str, int], str] = {}  # (weight, axis) → its DequantizeLinear's output
    done: list[str] = []
    rewritten = []
    for node in graph.node:
        if node.name in wanted and node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            weight = node.input[1]
            init = initializers.get(weight)
            if init is not None and len(init.dims) == 2:
                trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
                axis = 0 if trans_b else 1  # the output channels of y = x·W ([K, N]) or x·Wᵀ ([N, K])
                key = (weight, axis)
                if key not in levels_of:
                    values = numpy_helper.to_array(init, base_dir=base_dir).astype(np.float32)
                    levels_of[key] = _dequantized(graph, rewritten, weight, values, axis)
                node.input[1] = levels_of[key]
                done.append(node.name)
        rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    read = {name for node in graph.node for name in node.input}
    replaced = {weight for weight, _ in levels_of}
    unread = [init for init in graph.initializer if init.name in replaced and init.name not in read]
    for init in unread:
        graph.initializer.remove(init)
    return done


def _dequantized(graph: Any, nodes: list[Any], weight: str, values: np.ndarray, axis: int) -> str:
    """Append the int8 levels, scale and zero point of `weight` and the DequantizeLinear that reads them (to `nodes`,
    before its first reader); return the float weight's new name."""
    peak = np.abs(values).max(axis=1 - axis)
    scale = np.where(peak > 0, peak / WEIGHT_QMAX, 1.0).astype(np.float32)
    shaped = scale[:, None] if axis == 0 else scale[None, :]
    levels = np.clip(np.round(values / shaped), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    suffix = "" if axis == 1 else "_t"  # onnxruntime's names for the [K, N] layout GPTQ reads
    names = (f"{weight}_quantized{suffix}", f"{weight}_scale{suffix}", f"{weight}_zero_point{suffix}")
    graph.initializer.extend(
        [
            numpy_helper.from_array(levels, names[0]),
            numpy_helper.from_array(scale, names[1]),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), names[2]),
        ]
    )
    output = f"{weight}_dequantized{suffix}"
    nodes.append(helper.make_node("DequantizeLinear", list(names), [output], name=f"{output}_node", axis=axis))
    return output
