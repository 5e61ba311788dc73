"""Activation statistics from the float graph on calibration feeds, streamed one sample at a time.

For each weight op's input: per-channel min and max (SmoothQuant's migration and the int8 ranges both come
from these) and a small token sample for sensitivity. For FP16: every float tensor's max |value|.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pue.calibration.graph_ops import WeightOp

SENSITIVITY_SAMPLES = 8
TOKENS_PER_SAMPLE = 256
PEAK_TOKENS = 4  # each calibration row's largest tokens, kept beside the random sample (range choice: `ranges`)


@dataclass
class ChannelStats:
    minimum: np.ndarray
    maximum: np.ndarray
    samples: list[np.ndarray] = field(default_factory=list)  # [tokens, channels] rows for sensitivity
    token_ratio: float = 0.0  # largest token's max |x| over the median token's, worst calibration row (massive tokens)
    peaks: list[np.ndarray] = field(default_factory=list)  # each row's PEAK_TOKENS largest tokens [k, channels]

    def second_moment(self) -> np.ndarray | None:
        """The input's second moment E[xᵀx] over the token sample (GPTQ's Hessian); None without one. The sample, not
        every calibration token: measured on `llava_next gains-few` int8-dynamic, GPTQ from Σ xᵀx over every token
        of all rows (or of the same 8 rows) checked at min 0.983-0.984 where the sample's gave 0.996 (BENCHMARKS.md,
        "GPTQ's Hessian")."""
        return second_moment(self.samples) if self.samples else None

    def scaled(self, scale: np.ndarray) -> ChannelStats:
        """The statistics of this input divided per channel by `scale` (smoothing's migration)."""
        return ChannelStats(
            self.minimum / scale,
            self.maximum / scale,
            [rows / scale for rows in self.samples],
            self.token_ratio,  # measured before the migration: a token outlier is not a channel's to move
            [rows / scale for rows in self.peaks],
        )

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.minimum), np.abs(self.maximum))

    def outlier_ratio(self) -> float:
        """Largest channel's max |x| over the median channel's (trained LLMs: often > 50)."""
        absmax = self.absmax
        return float(absmax.max() / max(float(np.median(absmax)), 1e-12))


def activation_session(model: Any, outputs: list[str]) -> Any:
    """An onnxruntime session on `model` that also returns the named intermediate tensors (no graph fusions)."""
    import onnxruntime as ort

    augmented = copy.deepcopy(model)
    existing = {o.name for o in augmented.graph.output}
    for name in outputs:
        if name not in existing:
            augmented.graph.output.add(name=name)  # type and shape left to onnxruntime
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
    options.log_severity_level = 3
    return ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])


def second_moment(samples: list[np.ndarray]) -> np.ndarray:
    """E[xᵀx] over token rows ([tokens, channels] each), float32."""
    rows = np.concatenate([np.asarray(s, np.float32) for s in samples])
    return (rows.T @ rows / np.float32(max(len(rows), 1))).astype(np.float32)


def collect_channel_stats(
    model: Any,
    ops: list[WeightOp],
    feeds: Iterable[dict[str, np.ndarray]],
    seed: int = 0,
    observe: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> dict[str, ChannelStats]:
    """Per-channel min/max of every weight op's activation input over all feeds (last axis = channels), the token
    sample and each row's peak tokens. `observe` (optional) is shown the graph's own outputs of each feed, by its
    index (the run computes them anyway: the parent's rows of the calibration rows, `pue.calibration.check_rows`)."""
    names = sorted({op.activation for op in ops})
    channel_axis = {op.activation: (1 if op.op_type == "Conv" else -1) for op in ops}
    session = activation_session(model, names)
    own = [o.name for o in model.graph.output if o.name not in set(names)] if observe is not None else []
    rng = np.random.default_rng(seed)
    stats: dict[str, ChannelStats] = {}
    for sample_index, feed in enumerate(feeds):
        fetched = session.run(names + own, feed)
        values = fetched[: len(names)]
        if observe is not None:
            observe(sample_index, dict(zip(own, fetched[len(names) :], strict=True)))
        for name, value in zip(names, values, strict=True):
            axis = channel_axis[name]
            rows = np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis]).astype(np.float32)
            lo, hi = rows.min(axis=0), rows.max(axis=0)
            if name not in stats:
                stats[name] = ChannelStats(lo, hi)
            else:
                np.minimum(stats[name].minimum, lo, out=stats[name].minimum)
                np.maximum(stats[name].maximum, hi, out=stats[name].maximum)
            token_absmax = np.abs(rows).max(axis=1)
            ratio = float(token_absmax.max() / max(float(np.median(token_absmax)), 1e-12))
            stats[name].token_ratio = max(stats[name].token_ratio, ratio)
            stats[name].peaks.append(rows[np.sort(np.argsort(token_absmax)[-PEAK_TOKENS:])])
            if sample_index < SENSITIVITY_SAMPLES:
                take = rng.choice(len(rows), size=min(TOKENS_PER_SAMPLE, len(rows)), replace=False)
                stats[name].samples.append(rows[np.sort(take)])
    return stats


def collect_tensor_absmax(model: Any, feeds: Iterable[dict[str, np.ndarray]], chunk: int = 256) -> dict[str, float]:
    """max |value| of every float tensor a node produces (FP16 keeps ops past 16,000 in FP32)."""
    from onnx import TensorProto, shape_inference

    inferred = shape_inference.infer_shapes(model)
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
    typed = {
        v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    names = [o for node in model.graph.node for o in node.output if o and typed.get(o) in float_types]
    feeds = list(feeds)  # small: FP16 uses few samples
    absmax: dict[str, float] = {}
    for start in range(0, len(names), chunk):
        group = names[start : start + chunk]
        session = activation_session(model, group)
        for feed in feeds:
            for name, value in zip(group, session.run(group, feed), strict=True):
                finite = np.abs(value[np.isfinite(value)]) if value.size else np.zeros(1)
                peak = float(finite.max()) if finite.size else 0.0
                if not np.all(np.isfinite(value)):
                    peak = float("inf")
                absmax[name] = max(absmax.get(name, 0.0), peak)
    return absmax
