"""The float graphs the INT8 search (`pue.calibration.int8_search`) quantizes, prepared once: activation statistics,
outlier smoothing, each float graph saved once, and the copies whose amplified residual channels are computed in float
(`channel_split`); and pue's own activation ranges per rule (static MinMax). `search_quantizer` makes each attempt's
candidate from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pue.calibration.candidates import READERS, SPLIT
from pue.calibration.graph_ops import WeightOp, weight_ops

if TYPE_CHECKING:
    from pue.calibration.channel_split import ChannelSplit, ReaderSplit
    from pue.calibration.stats import ChannelStats

__all__ = ["PreparedGraphs", "activation_ranges", "own_ranges", "prepare_graphs"]


@dataclass(frozen=True)
class PreparedGraphs:
    """What `prepare_graphs` made of the caller's graphs, each dict keyed by graph name."""

    ops: list[WeightOp]  # every graph's weight-bearing ops the search quantizes, in graph order (after smoothing)
    stats: dict[str, ChannelStats]  # their inputs' activation statistics
    smoothed: list[dict[str, Any]]  # the op groups smoothing migrated outliers from, as fidelity.json records them
    float_paths: dict[str, Path]  # each float graph, saved once (external data beside it)
    # the graphs whose residual-stream writers' amplified columns can be computed in float (`channel_split`): the
    # split copy of the float graph, and what was split
    split_paths: dict[str, Path]
    splits: dict[str, ChannelSplit]
    # ... and the copies whose stream readers also compute the amplified input rows in float (`split_reader_rows`)
    reader_paths: dict[str, Path]
    reader_splits: dict[str, ReaderSplit]

    def ops_of(self, name: str) -> list[WeightOp]:
        """One graph's weight-bearing ops, in graph order."""
        return [op for op in self.ops if op.graph == name]

    def source_of(self, name: str, rule: str) -> Path:
        """The float graph a rule quantizes: with the readers' and writers' split, the writers' only, or neither."""
        if READERS in rule and name in self.reader_paths:
            return self.reader_paths[name]
        return self.split_paths[name] if SPLIT in rule and name in self.split_paths else self.float_paths[name]


def prepare_graphs(
    models: dict[str, Any],
    feeds: dict[str, Callable[..., Any]],
    work: Path,
    options: Any,
    scheme: Any,
    say: Callable[[str], None],
    layouts: dict[str, dict[str, Any]] | None = None,
    observers: dict[str, Callable[[Any, int, dict[str, Any]], None]] | None = None,
) -> PreparedGraphs:
    """Statistics of each graph's weight-bearing ops (static INT8: MatMul/Gemm/Conv; dynamic: MatMul) on its
    calibration feeds (`observers`, per graph: shown the feeds, each feed's index and the graph's own outputs for
    it), smoothing (`options.smooth`; `layouts`: each graph's attention heads, for the v_proj fold),
    each float graph saved under `work`, and with `options.split_channels` the split copies of graphs where norm gains
    amplify residual channels. Each entry of `models` becomes its saved graph loaded without its weights."""
    import onnx

    from pue.calibration.channel_split import amplified_channels, save_split_graphs
    from pue.calibration.smoothing import smooth_model
    from pue.calibration.stats import collect_channel_stats

    static = options.spec.calibrated  # static Q/DQ (calibrated scales) on MatMul/Gemm/Conv; else dynamic, MatMul
    all_ops, all_stats, smoothed, float_paths = [], {}, [], {}
    split_paths: dict[str, Path] = {}
    splits: dict[str, ChannelSplit] = {}
    reader_paths: dict[str, Path] = {}
    reader_splits: dict[str, ReaderSplit] = {}
    for name, model in models.items():
        amplified = amplified_channels(model) if options.split_channels else ([], [])  # before smoothing's folds
        ops = [op for op in weight_ops(model, name) if static or op.op_type == "MatMul"]
        say(f"{name}: activation statistics of {len(ops)} weight-bearing ops")
        source, observer = feeds[name](), (observers or {}).get(name)
        observe = None if observer is None else partial(observer, source)
        stats = collect_channel_stats(model, ops, source, seed=options.seed, observe=observe)
        if options.smooth:
            ops, stats, groups = smooth_model(model, ops, stats, scheme, layout=(layouts or {}).get(name))
            smoothed += [dict(g.to_dict(), graph=name) for g in groups]
        all_ops += ops
        all_stats.update(stats)
        float_paths[name] = work / f"{name}.float.onnx"
        onnx.save_model(model, str(float_paths[name]), save_as_external_data=True, location=f"{name}.float.data")
        if amplified[0]:
            saved = save_split_graphs(float_paths[name], name, amplified)
            splits[name] = saved.writers
            if saved.writers_path is not None:
                split_paths[name] = saved.writers_path
            if saved.readers is not None and saved.readers_path is not None:
                reader_splits[name], reader_paths[name] = saved.readers, saved.readers_path
        # saving cleared the graph's weights, not their memory (protobuf frees a message's bytes with the message): the
        # search reads the file from here on, so the caller's graph becomes the weightless one and the loaded one goes
        models[name] = onnx.load(str(float_paths[name]), load_external_data=False)
    if smoothed:
        say(f"smoothing: migrated activation outliers of {len(smoothed)} op groups into their weights")
    for name, split in splits.items():
        if split.writers:
            say(
                f"{name}: residual channels {split.channels} amplified by later norm gains (up to "
                f"{max(split.gain_ratios):.0f}x): their columns of {len(split.writers)} writers tried in float"
            )
    return PreparedGraphs(all_ops, all_stats, smoothed, float_paths, split_paths, splits, reader_paths, reader_splits)


def own_ranges(options: Any) -> bool:
    """Static INT8 with MinMax: each activation's range is pue's (`pue.calibration.ranges`), handed to onnxruntime as
    overrides (its calibration pass then reads one row); the error-chosen ranges are a second candidate."""
    return options.spec.calibrated and options.method == "minmax"


def activation_ranges(
    prepared: PreparedGraphs, own: bool, scheme: Any
) -> tuple[dict[str, dict[str, tuple[float, float]]], dict[str, float]]:
    """Where the ranges are pue's (`own`, see `own_ranges`): each rule's ranges per activation ("minmax", "mse"), the
    readers' masked inputs included, and the clip the error-chosen ranges apply per activation. Else both empty."""
    import onnx

    from pue.calibration.channel_split import masked_ranges

    range_rules: dict[str, dict[str, tuple[float, float]]] = {}
    clips: dict[str, float] = {}
    if own:
        from pue.calibration.ranges import minmax_ranges, mse_ranges

        range_rules["minmax"] = minmax_ranges(prepared.ops, prepared.stats)
        range_rules["mse"] = {}
        for name, path in prepared.float_paths.items():
            chosen_ranges, chosen_clips = mse_ranges(
                onnx.load(str(path)), prepared.ops_of(name), prepared.stats, scheme
            )
            range_rules["mse"].update(chosen_ranges)
            clips.update(chosen_clips)

    # the readers' masked inputs: their sources' ranges without the channels
    for readers in prepared.reader_splits.values():
        for rule_ranges in range_rules.values():
            rule_ranges.update(masked_ranges(readers, prepared.stats))
    return range_rules, clips
