"""Static INT8 activation ranges: MinMax, or the range that minimises each weight op's output error (issue 14, item 4).

A per-tensor range set by the single largest value spends the int8 grid on values that rarely occur; a clipped range
rounds the ordinary values finer and saturates the rare ones. Which is better depends on what the op does with the
saturated values, so each activation's range is chosen by the squared error of its weight ops' OUTPUTS (int8 input
and weight against float, `pue.calibration.simulate`), over a grid of clip factors of its MinMax range, on sampled
token rows that always include each calibration row's largest tokens (`ChannelStats.peaks`): a massive token is
what a clip would saturate, so it must be in the sample that judges the clip.

The ranges are handed to onnxruntime's quantizer as `TensorQuantOverrides` (rmin/rmax), so MinMax itself comes from
pue's statistics pass and onnxruntime's calibration pass needs one row only. Whether the error-chosen ranges are used
at all is decided end to end, by the INT8 search's calibration check (`pue.calibration.int8_search`).

onnxruntime's own histogram calibrators (Percentile, Entropy, Distribution) were not used for this: they histogram
every input and output of every MatMul of the graph (attention's scores included: several GB at 8-32 rows on a tiny
model, NOTES.md), fail on the mask path's -inf, and pick one rule for every tensor; `--calibration-method` still
offers them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import numpy_helper

from pue.calibration.graph_ops import WeightOp
from pue.calibration.simulate import WEIGHT_QMAX, qdq_activation, qdq_weight
from pue.calibration.stats import ChannelStats

CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
RANGE_RULES = ("minmax", "mse")


def minmax_ranges(ops: list[WeightOp], stats: dict[str, ChannelStats]) -> dict[str, tuple[float, float]]:
    """Each quantized activation's range over every calibration row (what onnxruntime's MinMax calibrator finds)."""
    ranges = {}
    for op in ops:
        channel = stats.get(op.activation)
        if channel is not None:
            ranges[op.activation] = (float(channel.minimum.min()), float(channel.maximum.max()))
    return ranges


def mse_ranges(
    model: Any, ops: list[WeightOp], stats: dict[str, ChannelStats], scheme: str
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Per activation, the clip of its MinMax range with the least squared output error summed over the MatMuls that
    read it; returns the ranges and the clip factor chosen for each (1.0: MinMax was best)."""
    weights = {init.name: init for init in model.graph.initializer}
    groups: dict[str, list[WeightOp]] = {}
    for op in ops:
        if op.op_type == "MatMul" and op.weight in weights:
            groups.setdefault(op.activation, []).append(op)
    ranges, clips = minmax_ranges(ops, stats), {}
    for activation, group in groups.items():
        channel = stats.get(activation)
        if channel is None or not channel.samples:
            continue
        rows = np.concatenate(list(channel.samples) + list(channel.peaks))
        lo, hi = ranges[activation]
        pairs = []
        for op in group:
            weight = numpy_helper.to_array(weights[op.weight]).astype(np.float32)
            if weight.ndim == 2:
                pairs.append((weight, qdq_weight(weight, WEIGHT_QMAX[scheme])))
        if not pairs:
            continue
        references = [rows @ weight for weight, _ in pairs]
        errors = []
        for clip in CLIPS:
            quantized = qdq_activation(rows, lo * clip, hi * clip, scheme)
            errors.append(
                sum(float(((quantized @ wq - y) ** 2).sum()) for (_, wq), y in zip(pairs, references, strict=True))
            )
        best = CLIPS[int(np.argmin(errors))]
        ranges[activation] = (lo * best, hi * best)
        clips[activation] = best
    return ranges, clips


def range_overrides(ranges: dict[str, tuple[float, float]]) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime's `TensorQuantOverrides` for these activation ranges (per tensor)."""
    return {
        name: [{"rmin": np.array(min(lo, 0.0), np.float32), "rmax": np.array(max(hi, 0.0), np.float32)}]
        for name, (lo, hi) in ranges.items()
    }


__all__ = ["CLIPS", "RANGE_RULES", "minmax_ranges", "mse_ranges", "range_overrides"]
