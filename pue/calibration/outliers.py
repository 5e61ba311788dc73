"""Where a bundle's activation outliers are, measured where INT8 would see them.

For every weight-bearing op's activation input (after the norms, at the `down_proj` inputs, at the projector
input), over the calibration feeds of the FP32 graphs:

- channels: each channel's max |x| over all tokens; the ratio of the largest to the median channel, and which
  channels lead (norm-gain outliers: a few channels large for every token);
- tokens: each token's max |x| over its channels; the ratio of the largest to the median token, and at which
  sequence positions (massive activations, high-norm vision tokens: a few positions large on every channel).

One per-tensor INT8 scale is set by the largest value, so either ratio in the hundreds flattens everything else
to a few levels. `pue-export outliers BUNDLE` prints it before anyone spends the time to quantize.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pue.calibration.graph_ops import WeightOp

TOP = 3


@dataclass
class TensorOutliers:
    """The outliers of one quantizable activation tensor."""

    graph: str
    tensor: str
    readers: list[str]  # the weight ops that read it
    channels: int
    channel_ratio: float  # largest channel max |x| / median channel max |x|
    top_channels: list[int]
    token_ratio: float  # largest token max |x| / median token max |x|
    top_positions: list[int]  # sequence positions of the largest tokens (most frequent first)
    max_abs: float

    @property
    def worst_ratio(self) -> float:
        return max(self.channel_ratio, self.token_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Accumulator:
    def __init__(self) -> None:
        self.channel_absmax: np.ndarray | None = None
        self.token_absmax: list[np.ndarray] = []  # one [rows, positions] array per sample
        self.leaders: Counter[int] = Counter()

    def add(self, rows: np.ndarray, top: int) -> None:
        """`rows`: [sequences, positions, channels] of one sample."""
        magnitude = np.abs(rows)
        per_channel = magnitude.max(axis=(0, 1))
        self.channel_absmax = (
            per_channel if self.channel_absmax is None else np.maximum(self.channel_absmax, per_channel)
        )
        per_token = magnitude.max(axis=2)
        self.token_absmax.append(per_token.reshape(-1))
        positions = np.broadcast_to(np.arange(per_token.shape[1]), per_token.shape).reshape(-1)
        for index in np.argsort(per_token.reshape(-1))[::-1][:top]:
            self.leaders[int(positions[index])] += 1


def collect_outliers(
    model: Any, ops: list[WeightOp], feeds: Iterable[dict[str, np.ndarray]], top: int = TOP
) -> list[TensorOutliers]:
    """Outliers of every weight op's activation input over `feeds` (streamed, one sample at a time)."""
    from pue.calibration.stats import activation_session

    readers: dict[str, list[str]] = {}
    channel_axis: dict[str, int] = {}
    graph = ops[0].graph if ops else ""
    for op in ops:
        readers.setdefault(op.activation, []).append(op.node)
        channel_axis[op.activation] = 1 if op.op_type == "Conv" else -1
    names = sorted(readers)
    session = activation_session(model, names)
    accumulators = {name: _Accumulator() for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            accumulators[name].add(_as_sequences(value, channel_axis[name]), top)
    report = []
    for name in names:
        acc = accumulators[name]
        if acc.channel_absmax is None:
            continue
        channels, tokens = acc.channel_absmax, np.concatenate(acc.token_absmax)
        report.append(
            TensorOutliers(
                graph=graph,
                tensor=name,
                readers=readers[name],
                channels=int(len(channels)),
                channel_ratio=_ratio(channels),
                top_channels=[int(i) for i in np.argsort(channels)[::-1][:top]],
                token_ratio=_ratio(tokens),
                top_positions=[position for position, _ in acc.leaders.most_common(top)],
                max_abs=float(channels.max()),
            )
        )
    return report


def _as_sequences(value: np.ndarray, channel_axis: int) -> np.ndarray:
    """[sequences, positions, channels]: channels last; a Conv's spatial grid flattened into positions."""
    moved = np.moveaxis(value, channel_axis, -1).astype(np.float32)
    if moved.ndim == 2:
        return moved[None]
    return moved.reshape(-1, int(np.prod(moved.shape[1:-1])), moved.shape[-1])


def _ratio(values: np.ndarray) -> float:
    return float(values.max() / max(float(np.median(values)), 1e-12))


def summarize(report: list[TensorOutliers], threshold: float = 20.0) -> dict[str, Any]:
    """What `fidelity.json` and `inspect` carry: the worst tensors and how many exceed `threshold`."""
    ranked = sorted(report, key=lambda t: t.worst_ratio, reverse=True)
    return {
        "threshold": threshold,
        "tensors": len(report),
        "channel_outlier_tensors": sum(t.channel_ratio >= threshold for t in report),
        "token_outlier_tensors": sum(t.token_ratio >= threshold for t in report),
        "worst": [t.to_dict() for t in ranked[:10]],
    }


def bundle_outliers(
    bundle: Any,
    calib: list[Any] | None = None,
    num_patches: int = 16,
    num_captions: int = 16,
    seed: int = 0,
    magnification: float | None = None,
    mpp: float | None = None,
    top: int = TOP,
    progress: Any = None,
    rotate: bool = False,
) -> dict[str, list[TensorOutliers]]:
    """The outlier report of an FP32 bundle's graphs on calibration patches (default: the shipped ones).

    `rotate`: the decoder is measured after `pue.calibration.rotation.rotate_decoder` (seeded by `seed`).
    """
    from pathlib import Path

    import onnx

    from pue.bundle import read_manifest, verify_files
    from pue.calibration.graph_ops import weight_ops
    from pue.calibration.readers import DecoderFeeds, VisionFeeds, default_captions, make_plan
    from pue.calibration.sampling import sample_patches
    from pue.calibration.sources import open_sources
    from pue.runtime import Embedder

    say = progress or (lambda message: None)
    bundle_dir = Path(bundle)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    sources = open_sources(calib, patch_size=manifest.tile_size, magnification=magnification, mpp=mpp)
    patches, _ = sample_patches(sources, num_patches, seed=seed)
    plan = make_plan(patches, default_captions(num_captions, seed), seed=seed)
    say(f"calibration set: {plan.counts()} from {len(sources)} source(s)")
    report: dict[str, list[TensorOutliers]] = {}
    with Embedder.load(bundle_dir) as parent:
        feeds = {"vision": lambda: VisionFeeds(parent, plan.patches), "decoder": lambda: DecoderFeeds(parent, plan)}
        for name, spec in manifest.graphs.items():
            model = onnx.load(str(bundle_dir / spec.file.path))
            if rotate and name == "decoder":
                from pue.calibration.rotation import rotate_decoder

                rotate_decoder(model, seed)
            ops = weight_ops(model, name)
            say(f"{name}: the inputs of {len(ops)} weight-bearing ops")
            report[name] = collect_outliers(model, ops, feeds[name](), top=top)
    return report
