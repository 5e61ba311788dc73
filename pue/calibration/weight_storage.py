"""8-bit INT8 weights that onnxruntime computes exactly on every CPU: stored as uint8 around 128.

onnxruntime's INT8 bundles keep 7-bit weights (`pue.precisions`): x86 CPUs without VNNI or AMX multiply uint8
activations by int8 weights with `vpmaddubsw`, which sums pairs of products in int16 and saturates with full-range
weights. Half the weight steps is what some models cannot afford: where norm gains amplify a few channels, the
rounding of every weight compounds through the blocks (issue 14: `llava_next gains-few` seed 2, static INT8 for
onnxruntime, held-out minimum cosine 0.9357 with 7-bit weights, 0.9964 with 8-bit, the same search otherwise).

The same full-range levels stored as `uint8` (level + 128, zero point 128) are the same numbers; onnxruntime then
picks its u8×u8 kernels, which widen both operands to 16 bits before multiplying and cannot saturate. They run slower
than u8×s8 (measured on the AVX2 EPYC in BENCHMARKS.md), so the INT8 search tries them only while its check fails
(`search_variants`). The per-token path (`pue.calibration.per_token`) stores its weights the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, numpy_helper

__all__ = ["UNSIGNED_SUFFIX", "WEIGHT_QMAX", "drop_unread_initializers", "store_weights_unsigned"]

WEIGHT_QMAX = 127  # full 8-bit symmetric levels
UNSIGNED_SUFFIX = "_u8"  # the uint8 copies' names: `{weight}_quantized_u8`, `{weight}_quantized_u8_zero_point`
# where each node reads its int8 weight: DequantizeLinear (static Q/DQ) its input 0 with zero point 2, MatMulInteger
# (onnxruntime's dynamic INT8) its input 1 with zero point 3
_WEIGHT_INPUTS = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3)}


def store_weights_unsigned(model: Any) -> list[str]:
    """Rewrite `model` in place so that every symmetric int8 weight (an int8 initializer with zero point 0 that a
    DequantizeLinear or MatMulInteger reads) is a uint8 initializer holding level + 128 with zero point 128: the
    same values, computed by onnxruntime's u8×u8 kernels. Returns the weights rewritten, in graph order.

    A weight is left alone where another kind of node reads it too, or where its zero point is not 0 (activations'
    Q/DQ pairs are not weights: their inputs are computed tensors, not initializers)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, list[tuple[Any, int, int]]] = {}
    others: set[str] = set()
    for node in graph.node:
        slots = _WEIGHT_INPUTS.get(node.op_type)
        for index, name in enumerate(node.input):
            if slots is not None and index == slots[0]:
                readers.setdefault(name, []).append((node, slots[0], slots[1]))
            elif name in initializers:
                others.add(name)
    done = []
    for name, uses in readers.items():
        init = initializers.get(name)
        if init is None or name in others or init.data_type != TensorProto.INT8:
            continue
        zeros = [_zero_point(initializers, node, slot) for node, _, slot in uses]
        if any(zero is None or np.any(zero != 0) for zero in zeros):
            continue
        levels = numpy_helper.to_array(init).astype(np.int16)
        stored = numpy_helper.from_array((levels + 128).astype(np.uint8), name + UNSIGNED_SUFFIX)
        graph.initializer.append(stored)
        zero_name = name + UNSIGNED_SUFFIX + "_zero_point"
        shape = zeros[0].shape  # per channel or scalar, as the quantizer wrote it
        graph.initializer.append(numpy_helper.from_array(np.full(shape, 128, np.uint8), zero_name))
        for node, weight_slot, zero_slot in uses:
            node.input[weight_slot] = stored.name
            while len(node.input) <= zero_slot:
                node.input.append("")
            node.input[zero_slot] = zero_name
        done.append(name)
    drop_unread_initializers(model)
    return done


def _zero_point(initializers: dict[str, Any], node: Any, slot: int) -> np.ndarray | None:
    """A node's weight zero point (0 where it has none); None where it is not an initializer."""
    if len(node.input) <= slot or not node.input[slot]:
        return np.zeros((), np.int8)
    init = initializers.get(node.input[slot])
    return None if init is None else numpy_helper.to_array(init)


def drop_unread_initializers(model: Any) -> None:
    """Remove the initializers no node reads (and no graph output names) any more, in place."""
    read = {name for node in model.graph.node for name in node.input}
    outputs = {value.name for value in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in read or init.name in outputs]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
