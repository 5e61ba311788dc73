"""INT8 graphs with onnxruntime's quantization tools: static explicit Q/DQ, or dynamic, weight-bearing ops only."""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
from onnx import numpy_helper

from pue.calibration.graph_ops import WeightOp
from pue.calibration.simulate import matmul_sqnr
from pue.calibration.stats import ChannelStats
from pue.choices import Precision
from pue.errors import PueError
from pue.precisions import U8_DYNAMIC, precision_spec

log = logging.getLogger(__name__)


def activation_scheme(precision: str, target: str) -> str:
    """ "u8", "s8" or "dynamic": the activation scheme of this precision's Q/DQ flavour for `target`."""
    qdq = precision_spec(precision, target).qdq
    if qdq is None:
        raise PueError(f"{precision} graphs hold no Q/DQ nodes", "activation schemes belong to INT8 precisions")
    return qdq.scheme


def rank_sensitivity(model: Any, ops: list[WeightOp], stats: dict[str, ChannelStats], scheme: str) -> list[dict]:
    """Each weight op's SQNR (dB) with int8 input and weight alone, on sampled calibration rows; worst first.

    Isolated per layer (no upstream error), from statistics already collected: no extra model evaluations.
    """
    weights = {init.name: init for init in model.graph.initializer}
    scores = []
    for op in ops:
        channel = stats.get(op.activation)
        if op.op_type != "MatMul" or channel is None or not channel.samples:
            continue
        weight = numpy_helper.to_array(weights[op.weight]).astype(np.float32)
        sqnr = matmul_sqnr(channel.samples, weight, float(channel.minimum.min()), float(channel.maximum.max()), scheme)
        scores.append({"graph": op.graph, "node": op.node, "sqnr_db": sqnr, "outlier_ratio": channel.outlier_ratio()})
    return sorted(scores, key=lambda s: s["sqnr_db"])


def quantize_static_graph(
    model_path: Path,
    output_path: Path,
    reader: Any,
    nodes: list[str],
    target: str,
    method: str = "minmax",
    cache_path: Path | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    full_weights: bool = False,
) -> None:
    """Static Q/DQ of `nodes`' inputs. `full_weights`: 8-bit weight levels where the flavour keeps 7 (the caller stores
    them as uint8: `pue.calibration.weight_storage`). `ranges`: each activation's [rmin, rmax]
    (`pue.calibration.ranges`; those of other graphs are ignored), given to onnxruntime as overrides; when every input
    `nodes` read has one and is a tensor onnxruntime's quantizer sees (its shape inference names it), its calibrator
    only has to run, on the reader's first row; otherwise those few keep its MinMax over every row (the same values as
    pue's MinMax)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not nodes:
        raise PueError(f"no weight-bearing op of {model_path.name} is left to quantize")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    qdq = precision_spec(Precision.INT8, target).qdq
    assert qdq is not None and qdq.static, f"static INT8 for {target} has static Q/DQ"
    symmetric = qdq.symmetric
    extra = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        "DedicatedQDQPair": qdq.dedicated_pairs,  # TensorRT wants its own Q/DQ pair per consumer
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        # Inputs only, as the design says (weights and the activations they read). onnxruntime's QDQ quantizer also
        # quantizes a MatMul's output by default: per tensor, with one range for every token, so a residual writer
        # (down_proj) carrying a massive token zeroes every other token's update, and q/k/v reach attention
        # rounded. TensorRT wants Q/DQ at op inputs; onnxruntime fuses DQ→MatMul into MatMulIntegerToFloat.
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"],
        # No CalibMaxIntermediateOutputs: in onnxruntime 1.32 it discards the collected chunk without merging its
        # ranges. MinMax augments the graph with ReduceMin/ReduceMax, so each sample keeps only scalars anyway.
    }
    if ranges:
        from pue.calibration.ranges import range_overrides

        known, reads = _inferred_tensors(model_path, set(nodes))
        ranges = {name: r for name, r in ranges.items() if name in reads}  # this graph's, of the ops it quantizes
        extra["TensorQuantOverrides"] = range_overrides({name: r for name, r in ranges.items() if name in known})
        if reads <= known and reads <= set(ranges):
            reader = _FirstRows(reader, 1)
    kwargs: dict[str, Any] = {}
    if cache_path is not None and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        kwargs["calibration_cache_path"] = cache_path
    reader.rewind()
    with _quiet_root_logger():
        quantize_static(
            str(model_path),
            str(output_path),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            per_channel=True,
            # weights only: 7 bits where u8×s8 could saturate, unless the caller stores 8 bits as uint8
            reduce_range=qdq.reduced_weight_range and not full_weights,
            activation_type=QuantType.QInt8 if qdq.activation_type == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=methods[method],
            extra_options=extra,
            **kwargs,
        )


def quantize_dynamic_graph(model_path: Path, output_path: Path, nodes: list[str], full_weights: bool = False) -> None:
    """onnxruntime's dynamic INT8 of the MatMuls `nodes`, per-channel weights (7 bits; 8 with `full_weights`, which
    the caller stores as uint8: `pue.calibration.weight_storage`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    matmuls = list(nodes)
    if not matmuls:
        raise PueError(f"no weight-bearing MatMul of {model_path.name} is left to quantize")
    with _quiet_root_logger():
        quantize_dynamic(
            str(model_path),
            str(output_path),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=U8_DYNAMIC.reduced_weight_range and not full_weights,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=matmuls,
            extra_options={"MatMulConstBOnly": True},
        )


def _inferred_tensors(model_path: Path, nodes: set[str]) -> tuple[set[str], set[str]]:
    """The tensor names onnxruntime's quantizer accepts overrides for (inputs, outputs, shape-inferred values), and
    the activations `nodes` read: their data inputs (a Conv's first, a MatMul's or Gemm's first two; a Gemm's bias
    is quantized from the other two's scales) that are neither initializers nor constants."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    graph = model.graph
    fixed = {init.name for init in graph.initializer}
    fixed |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    reads = {
        name
        for node in graph.node
        if node.name in nodes
        for name in node.input[: 1 if node.op_type == "Conv" else 2]
        if name and name not in fixed
    }
    return {v.name for v in [*graph.value_info, *graph.input, *graph.output]}, reads


class _FirstRows:
    """The first `count` rows of a calibration reader (get_next/rewind)."""

    def __init__(self, reader: Any, count: int) -> None:
        self.reader, self.count, self.given = reader, count, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.given >= self.count:
            return None
        self.given += 1
        return self.reader.get_next()

    def rewind(self) -> None:
        self.reader.rewind()
        self.given = 0

    def __len__(self) -> int:
        return min(self.count, len(self.reader))


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer logs advice on the root logger (pre-processing hints); keep pue's output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
