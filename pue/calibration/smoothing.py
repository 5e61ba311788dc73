"""SmoothQuant-style migration: move activation outliers into the weights before int8.

Per input channel j of a group of MatMuls sharing one activation: x_j / s_j and W_j,: · s_j leave the product
unchanged while flattening the outlier channels that make a per-tensor int8 scale useless. 1/s is folded into
the producing `Mul` by a constant vector (an RMSNorm/LayerNorm weight) when that Mul feeds only this group,
otherwise an explicit `Mul` is inserted (`pue.calibration.folds` says where a fold exists: norm gains, LayerNorms,
up_proj → down_proj, v_proj → o_proj). α is chosen per group by the simulated int8 error on calibration rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from onnx import numpy_helper

from pue.calibration.graph_ops import WeightOp
from pue.calibration.simulate import matmul_sqnr
from pue.calibration.stats import ChannelStats

ALPHAS = (0.5, 0.65, 0.8)
DEFAULT_OUTLIER_THRESHOLD = 8.0


@dataclass
class SmoothedGroup:
    activation: str
    nodes: list[str]
    outlier_ratio_before: float
    outlier_ratio_after: float
    alpha: float
    sqnr_before_db: float
    sqnr_after_db: float
    folded_into: str | None
    fold: str = "mul"  # how 1/s was applied: a `pue.calibration.folds` kind, or "mul" (an inserted Mul)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weights(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def _group_sqnr(
    group: list[WeightOp], stats: ChannelStats, weights: dict[str, np.ndarray], scale: np.ndarray, scheme: str
) -> float:
    samples = [rows / scale for rows in stats.samples]
    lo, hi = float((stats.minimum / scale).min()), float((stats.maximum / scale).max())
    return min(matmul_sqnr(samples, weights[op.weight] * scale[:, None], lo, hi, scheme) for op in group)


def smooth_model(
    model: Any,
    ops: list[WeightOp],
    stats: dict[str, ChannelStats],
    scheme: str,
    threshold: float = DEFAULT_OUTLIER_THRESHOLD,
    layout: dict[str, Any] | None = None,
    alphas: tuple[float, ...] = ALPHAS,
) -> tuple[list[WeightOp], dict[str, ChannelStats], list[SmoothedGroup]]:
    """Smooth every MatMul group whose input's outlier ratio exceeds `threshold`, in place on `model`.

    `layout`: the graph's attention heads (`export.attention`), so that o_proj's 1/s can fold into v_proj.
    Returns the ops and stats re-keyed to the (possibly renamed) activation tensors, and what was done.
    """
    from pue.calibration.folds import find_fold

    initializers = _weights(model)
    weight_use = {}
    for node in model.graph.node:
        for name in node.input:
            weight_use[name] = weight_use.get(name, 0) + 1
    groups: dict[str, list[WeightOp]] = {}
    for op in ops:
        groups.setdefault(op.activation, []).append(op)

    done: list[SmoothedGroup] = []
    new_ops: list[WeightOp] = []
    new_stats = dict(stats)
    for activation, group in groups.items():
        channel = stats.get(activation)
        eligible = (
            channel is not None
            and channel.samples
            and all(op.op_type == "MatMul" and weight_use.get(op.weight) == 1 for op in group)
            and channel.outlier_ratio() > threshold
        )
        if not eligible:
            new_ops.extend(group)
            continue
        weights = {op.weight: numpy_helper.to_array(initializers[op.weight]).astype(np.float32) for op in group}
        absmax_x = np.maximum(channel.absmax, 1e-8)
        absmax_w = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0), 1e-8)
        ones = np.ones_like(absmax_x)
        before = _group_sqnr(group, channel, weights, ones, scheme)
        best_alpha, best_scale, best = None, ones, before
        site = find_fold(model, activation, {op.node for op in group}, int(absmax_x.shape[0]), layout)
        for alpha in alphas:
            scale = np.clip(absmax_x**alpha / absmax_w ** (1 - alpha), 1e-5, 1e5).astype(np.float32)
            if site is not None:
                scale = site.tie(scale)
            score = _group_sqnr(group, channel, weights, scale, scheme)
            if score > best:
                best_alpha, best_scale, best = alpha, scale, score
        if best_alpha is None:
            new_ops.extend(group)
            continue
        for op in group:
            initializers[op.weight].CopyFrom(
                numpy_helper.from_array((weights[op.weight] * best_scale[:, None]).astype(np.float32), op.weight)
            )
        target, folded = activation, None
        if site is not None:
            site.apply(best_scale)
            folded = site.node
        else:
            target = _insert_mul(model, activation, group, best_scale)
        new_stats[target] = channel.scaled(best_scale)
        for op in group:
            op.activation = target
            new_ops.append(op)
        done.append(
            SmoothedGroup(
                target,
                [op.node for op in group],
                channel.outlier_ratio(),
                new_stats[target].outlier_ratio(),
                best_alpha,
                before,
                best,
                folded,
                site.kind if site is not None else "mul",
            )
        )
    return new_ops, new_stats, done


def _insert_mul(model: Any, activation: str, group: list[WeightOp], scale: np.ndarray) -> str:
    from onnx import helper

    base = activation.replace("/", "_").strip("_")
    inverse_name, output = f"pue_smooth_inv_{base}", f"{activation}_smoothed"
    model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse_name))
    node = helper.make_node("Mul", [activation, inverse_name], [output], name=f"pue_smooth_{base}")
    group_nodes = {op.node for op in group}
    position = 0
    for index, existing in enumerate(model.graph.node):
        if existing.name in group_nodes:
            position = index
            break
    model.graph.node.insert(position, node)
    for existing in model.graph.node:
        if existing.name in group_nodes:
            for i, name in enumerate(existing.input):
                if name == activation:
                    existing.input[i] = output
    return output
