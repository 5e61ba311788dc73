"""The residual-stream channels that later RMSNorm gains amplify, written in float (LLM.int8()-style decomposition on
the writers' output side), exactly in FP32.

Trained decoders carry a few residual channels whose RMSNorm gains are 20-1000× the median (issue 13's checkpoint:
60-80×). Every op that writes the residual stream (`o_proj`, `down_proj`) writes those channels with the int8 error of
its per-output-channel step, and the next norm multiplies that error by the gain: the embedding's error grows with the
gain however small each op's own error is. Rotation does not help (it spreads the writers' error onto those channels,
BENCHMARKS.md), smoothing acts on the readers' inputs, and GPTQ keeps each output column's own error small, not its
weight downstream.

This module computes those columns of every writer in float beside its int8 product:

    y  = x·W                       (the writer, int8 when the search quantizes it)
    y' = y + (x·W[:, C] − y[:, C])·E

with C the amplified channels, W[:, C] a float `Constant` (K × |C|) and E the |C| × N one-hot matrix that puts each
corrected column back in its place. In FP32 the correction is zero (the function is unchanged, to rounding); in INT8
it replaces the int8 values of those columns by float ones. Standard ONNX (Gather, MatMul, Sub, Add), so every target
runs it; the products are `Constant`s, not weight initializers, so the INT8 search never quantizes them (their FLOPs,
|C|·(K + N) per token per writer, are reported apart: `split_flops`). The side product must read the writer's float
input: static quantizers rewire every reader of a quantized tensor to its DequantizeLinear, which `read_float_inputs`
undoes after quantization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from pue.calibration.graph_index import GraphIndex, constant_node

PREFIX = "pue_split_"
#: a residual channel is amplified when a norm's |gain| on it is at least this many times that norm's median |gain|
AMPLIFIED_RATIO = 20.0


@dataclass
class ChannelSplit:
    """What `split_writer_columns` did, for `fidelity.json`."""

    channels: list[int]
    gain_ratios: list[float]  # per channel: its largest |gain| over that norm's median |gain|
    writers: list[str] = field(default_factory=list)
    side_nodes: list[str] = field(default_factory=list)  # the float side products (their inputs must stay float)
    split_flops: int = 0  # per token, all writers: the float side products and their placement
    other_sources: list[str] = field(default_factory=list)  # what else writes the stream (embedding, DeepStack)
    why_not: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def amplified_channels(model: Any, ratio: float = AMPLIFIED_RATIO) -> tuple[list[int], list[float]]:
    """The residual channels whose gain in some RMSNorm of the stream is ≥ `ratio` × that norm's median |gain|, with
    their largest such ratio; none for a graph without Llama-style RMSNorms."""
    from pue.calibration.rotation import RotationError, find_rms_norms, stream_norms

    try:
        norms = stream_norms(find_rms_norms(model))
    except RotationError:
        return [], []
    worst: dict[int, float] = {}
    for norm in norms:
        gain = np.abs(np.asarray(norm.gain, np.float64))
        median = float(np.median(gain))
        if median <= 0:
            continue
        for channel in np.nonzero(gain >= ratio * median)[0]:
            worst[int(channel)] = max(worst.get(int(channel), 0.0), float(gain[channel] / median))
    channels = sorted(worst)
    return channels, [worst[c] for c in channels]


def split_writer_columns(model: Any, amplified: tuple[list[int], list[float]] | None = None) -> ChannelSplit:
    """Rewrite `model` in place: every residual-stream writer's amplified columns also computed in float (above).
    `amplified`: the channels and their gain ratios (`amplified_channels`), read before smoothing folded its scales
    into the norm gains (the amplification is the same function, now partly in the readers' weights); by default
    read from `model`."""
    from pue.calibration.rotation import RotationError, find_rms_norms, stream_norms

    channels, ratios = amplified if amplified is not None else amplified_channels(model)
    split = ChannelSplit(list(channels), list(ratios))
    if not channels:
        split.why_not = f"no residual channel has an RMSNorm gain ≥ {AMPLIFIED_RATIO:g}× the norm's median"
        return split
    graph = GraphIndex(model)
    try:
        starts = [norm.residual for norm in stream_norms(find_rms_norms(model))]
    except RotationError as error:
        split.why_not = f"the residual stream's norms could not be read: {error.message}"
        return split
    writers, split.other_sources = _stream_writers(graph, starts)
    columns = np.asarray(channels, np.int64)
    for index, writer in enumerate(writers):
        weight = numpy_helper.to_array(graph.initializers[writer.input[1]]).astype(np.float32)
        if weight.ndim != 2 or int(columns.max()) >= weight.shape[1]:
            continue
        _split_one(graph, writer, weight, columns, f"{PREFIX}{index}")
        split.writers.append(writer.name)
        split.side_nodes.append(f"{PREFIX}{index}_side")
        split.split_flops += 2 * len(channels) * (weight.shape[0] + weight.shape[1])
    return split


def _stream_writers(graph: GraphIndex, starts: list[str]) -> tuple[list[Any], list[str]]:
    """Walk back from the norms' inputs through the residual stream's additions, selects and row moves: the weight
    MatMuls that write it, in graph order, and the other ops that feed it (graph inputs' splits such as Qwen3-VL's
    DeepStack features, the token embedding): those write no int8 product here and are left as they are."""
    from pue.calibration.rotation import ROW_OPS, _mixes_channels

    seen: set[str] = set()
    writers: dict[str, Any] = {}
    others: set[str] = set()
    stack = list(starts)
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        node = graph.producers.get(tensor)
        if node is None:
            continue  # a graph input
        if node.op_type == "MatMul" and node.input[1] in graph.initializers:
            writers[node.name] = node
        elif node.op_type == "Add":
            stack.extend(i for i in node.input[:2] if graph.constant(i) is None)
        elif node.op_type == "Where":
            stack.extend(node.input[1:3])
        elif node.op_type in ROW_OPS and not _mixes_channels(node) and node.input[0] not in graph.initializers:
            stack.append(node.input[0])  # rows moved or selected (a Gather of a table is the token embedding)
        else:
            others.add(f"{node.op_type} {node.name}")
    order = {node.name: i for i, node in enumerate(graph.graph.node)}
    return sorted(writers.values(), key=lambda n: order[n.name]), sorted(others)


def _split_one(graph: GraphIndex, writer: Any, weight: np.ndarray, columns: np.ndarray, tag: str) -> None:
    output = writer.output[0]
    product = f"{tag}_int8_output"
    writer.output[0] = product
    expand = np.zeros((len(columns), weight.shape[1]), np.float32)
    expand[np.arange(len(columns)), columns] = 1.0

    nodes = [
        constant_node(f"{tag}_columns", columns),
        constant_node(f"{tag}_weight", np.ascontiguousarray(weight[:, columns])),
        constant_node(f"{tag}_expand", expand),
        helper.make_node("Gather", [product, f"{tag}_columns"], [f"{tag}_taken"], name=f"{tag}_gather", axis=-1),
        helper.make_node("MatMul", [writer.input[0], f"{tag}_weight"], [f"{tag}_float"], name=f"{tag}_side"),
        helper.make_node("Sub", [f"{tag}_float", f"{tag}_taken"], [f"{tag}_correction"], name=f"{tag}_sub"),
        helper.make_node("MatMul", [f"{tag}_correction", f"{tag}_expand"], [f"{tag}_placed"], name=f"{tag}_place"),
        helper.make_node("Add", [product, f"{tag}_placed"], [output], name=f"{tag}_add"),
    ]
    _insert_after(graph, writer, nodes)


def _insert_after(graph: GraphIndex, anchor: Any, nodes: list[Any]) -> None:
    """`nodes`, in order, right after `anchor` (topological order kept: they read its output or earlier tensors)."""
    position = list(graph.graph.node).index(anchor) + 1
    for offset, node in enumerate(nodes):
        graph.graph.node.insert(position + offset, node)


@dataclass
class ReaderSplit:
    """What `split_reader_rows` did, for `fidelity.json`."""

    channels: list[int]
    readers: list[str] = field(default_factory=list)  # the weight MatMuls whose amplified input rows went float
    masked: dict[str, str] = field(default_factory=dict)  # each masked input tensor → the tensor the readers now read
    split_flops: int = 0  # per token, all readers: the float side products
    why_not: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_reader_rows(model: Any, channels: list[int]) -> ReaderSplit:
    """Rewrite `model` in place: every weight MatMul that reads a residual-stream norm's output computes the rows of
    `channels` in float beside its int8 product, LLM.int8()-style on the readers' side:

        y = (x ⊙ m)·W'  +  x[:, C]·W[C, :]

    with m the mask that zeroes C and W' the weight with rows C zeroed (a private copy where shared): the int8
    product's activation range and per-column weight steps no longer span the amplified channels, and their
    contribution is float. Exact in FP32. One mask `Mul` per norm output, shared by its readers; the side products'
    weights are `Constant`s (never quantized), and their input is the unmasked float tensor."""
    from pue.calibration.rotation import RotationError, _readers, find_rms_norms, stream_norms

    split = ReaderSplit(list(channels))
    if not channels:
        split.why_not = "no amplified residual channel"
        return split
    graph = GraphIndex(model)
    try:
        norms = stream_norms(find_rms_norms(model))
    except RotationError as error:
        split.why_not = f"the residual stream's norms could not be read: {error.message}"
        return split
    columns = np.asarray(channels, np.int64)
    index = 0
    for norm in norms:
        readers, _ = _readers(graph, norm.output)
        for reader in readers:
            weight = graph.constant(reader.input[1])
            if weight is None or weight.ndim != 2 or int(columns.max()) >= weight.shape[0]:
                continue
            source = reader.input[0]
            tag = f"{PREFIX}r{index}"
            index += 1
            if source not in split.masked:
                split.masked[source] = _mask(
                    graph, source, columns, weight.shape[0], f"{PREFIX}mask{len(split.masked)}"
                )
            kept = weight.astype(np.float32, copy=True)
            kept[columns, :] = 0.0
            graph.replace_constant_input(reader, 1, kept, f"{tag}_int8_weight")
            _side_rows(graph, reader, weight.astype(np.float32), columns, tag)
            reader.input[0] = split.masked[source]
            split.readers.append(reader.name)
            split.split_flops += 2 * len(channels) * weight.shape[1]
    if not split.readers:
        split.why_not = "no weight MatMul reads a residual-stream norm's output"
    return split


def _mask(graph: GraphIndex, source: str, columns: np.ndarray, width: int, tag: str) -> str:
    mask = np.ones(width, np.float32)
    mask[columns] = 0.0
    constant = constant_node(f"{tag}_value", mask)
    multiply = helper.make_node("Mul", [source, f"{tag}_value"], [f"{tag}_output"], name=tag)
    producer = graph.producers.get(source)
    nodes = list(graph.graph.node)
    position = nodes.index(producer) + 1 if producer is not None else 0
    graph.graph.node.insert(position, multiply)
    graph.graph.node.insert(position, constant)
    graph.producers[f"{tag}_output"] = multiply
    return f"{tag}_output"


def _side_rows(graph: GraphIndex, reader: Any, weight: np.ndarray, columns: np.ndarray, tag: str) -> None:
    output = reader.output[0]
    product = f"{tag}_int8_output"
    reader.output[0] = product
    nodes = [
        constant_node(f"{tag}_columns", columns),
        constant_node(f"{tag}_weight", np.ascontiguousarray(weight[columns, :])),
        helper.make_node(
            "Gather", [reader.input[0], f"{tag}_columns"], [f"{tag}_taken"], name=f"{tag}_gather", axis=-1
        ),
        helper.make_node("MatMul", [f"{tag}_taken", f"{tag}_weight"], [f"{tag}_float"], name=f"{tag}_side"),
        helper.make_node("Add", [product, f"{tag}_float"], [output], name=f"{tag}_add"),
    ]
    _insert_after(graph, reader, nodes)


@dataclass
class SplitGraphs:
    """A graph's split copies the INT8 search may quantize instead of its float graph (files beside it)."""

    writers: ChannelSplit
    writers_path: Path | None = None  # the writers' amplified columns in float
    readers: ReaderSplit | None = None
    readers_path: Path | None = None  # those columns and the readers' amplified rows in float


def save_split_graphs(float_path: Path, name: str, amplified: tuple[list[int], list[float]]) -> SplitGraphs:
    """The split copies of the float graph at `float_path` (saved beside it, weights as external data): the writers'
    split, and the writers' and readers' together (`split_writer_columns`, `split_reader_rows`)."""
    import onnx

    model = onnx.load(str(float_path))
    done = SplitGraphs(split_writer_columns(model, amplified))
    if not done.writers.writers:
        return done
    done.writers_path = float_path.with_name(f"{name}.split.onnx")
    onnx.save_model(model, str(done.writers_path), save_as_external_data=True, location=f"{name}.split.data")
    del model
    model = onnx.load(str(done.writers_path))
    done.readers = split_reader_rows(model, list(amplified[0]))
    if done.readers.readers:
        done.readers_path = float_path.with_name(f"{name}.readers.onnx")
        onnx.save_model(model, str(done.readers_path), save_as_external_data=True, location=f"{name}.readers.data")
    return done


def masked_ranges(readers: ReaderSplit, stats: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each masked input's activation range: its source's per-channel range (`ChannelStats`) without the amplified
    channels, and with 0, which the mask writes there; sources without statistics keep onnxruntime's own MinMax."""
    out = {}
    for source, masked in readers.masked.items():
        if source not in stats:
            continue
        low, high = np.asarray(stats[source].minimum), np.asarray(stats[source].maximum)
        keep = np.ones(low.shape[-1], bool)
        keep[[c for c in readers.channels if c < keep.size]] = False
        out[masked] = (min(0.0, float(low[..., keep].min())), max(0.0, float(high[..., keep].max())))
    return out


def masked_moments(moment_of: Callable[[str], Any], readers: ReaderSplit) -> Callable[[str], Any]:
    """GPTQ's Hessians for a readers' split graph: a reader's masked input is 0 on the amplified channels, so they
    are dead there (its int8 weight rows are zero; `gptq` keeps dead rows as they are)."""
    split_ops, channels = set(readers.readers), list(readers.channels)

    def moment(node: str) -> Any:
        value = moment_of(node)
        if value is None or node not in split_ops:
            return value
        value = value.copy()
        value[channels, :] = 0.0
        value[:, channels] = 0.0
        return value

    return moment


def read_float_inputs(model: Any, side_nodes: list[str]) -> int:
    """After static quantization: each side product reads its writer's float input again where the quantizer rewired
    it to a DequantizeLinear of a QuantizeLinear of that input. Returns how many were rewired."""
    index = GraphIndex(model)
    wanted = set(side_nodes)
    rewired = 0
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        dequantize = index.producers.get(node.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = index.producers.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        node.input[0] = quantize.input[0]
        rewired += 1
    return rewired


__all__ = [
    "AMPLIFIED_RATIO",
    "PREFIX",
    "ChannelSplit",
    "ReaderSplit",
    "SplitGraphs",
    "amplified_channels",
    "masked_moments",
    "masked_ranges",
    "read_float_inputs",
    "save_split_graphs",
    "split_reader_rows",
    "split_writer_columns",
]
