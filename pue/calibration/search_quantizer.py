"""Each attempt's candidate in the INT8 search (`pue.calibration.int8_search`): every graph quantized from the float
graph its rule names (`search_graphs`), afresh only when its request changed (else the last file is reloaded), with
GPTQ's levels and the ops the target backend computes differently kept across attempts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pue.calibration.candidates import GPTQ, READERS, SPLIT, WIDE, ranges_rule
from pue.calibration.output_bias import CORRECTED_GRAPHS
from pue.calibration.search_variants import GROUPED, per_token_path, stores_weights_unsigned
from pue.precisions import ActivationScheme

if TYPE_CHECKING:
    from pue.calibration.search_graphs import PreparedGraphs
    from pue.calibration.target_parity import TargetParity

__all__ = ["GraphQuantizer"]


class GraphQuantizer:
    """Each attempt's candidate graphs, from the float graphs `prepare_graphs` saved.

    Each graph's last quantization is kept: (its int8 ops, rule, split) → file. An attempt that changes one graph's ops
    (most fallback and token steps change the decoder's only) reloads the other's file: the same inputs, the same
    graph. GPTQ's levels are kept per op and grid across attempts; `target_float` collects the ops the target backend
    computes differently from onnxruntime (`parity`, static INT8: `pue.calibration.target_parity`), float from then on.
    """

    def __init__(
        self,
        prepared: PreparedGraphs,
        models: dict[str, Any],
        feeds: dict[str, Callable[..., Any]],
        work: Path,
        options: Any,
        range_rules: dict[str, dict[str, tuple[float, float]]],
        parity: TargetParity | None,
        say: Callable[[str], None],
        phase_done: Callable[[str], None],
    ) -> None:
        self.prepared = prepared
        self.models = models  # the caller's graphs, weightless: GPTQ reads their float weights from `work`
        self.feeds = feeds
        self.work = work
        self.options = options
        self.static = options.spec.calibrated
        self.range_rules = range_rules
        self.parity = parity
        self.say = say
        self.phase_done = phase_done
        self.target_float: set[str] = set()  # ops the target backend computes differently from onnxruntime
        # OpenVINO's run-time INT8: int8 weights alone (the search's ops are MatMuls, as for every dynamic flavour)
        self.grouped = options.spec.qdq.scheme == ActivationScheme.GROUPED
        # static INT8 for OpenVINO: its per-token ops are int8 weights alone (`search_variants.per_token_path`)
        self.grouped_tokens = per_token_path(options) == GROUPED
        self.last: dict[str, tuple[tuple[tuple[str, ...], str, bool], Path]] = {}  # (int8 ops, rule, split) → file
        self.activation_of = {op.node: op.activation for op in prepared.ops if op.activation in prepared.stats}
        self.gptq_cache: dict[tuple, Any] = {}  # GPTQ's levels per op and grid, kept across attempts
        self.reader_gptq_cache: dict[tuple, Any] = {}  # the same for the readers' split graphs (other weights, moments)
        self.reader_models: dict[str, Any] = {}  # those graphs, weightless (GPTQ reads the zeroed rows from there)
        self.gptq_ops: dict[str, list[str]] = {}  # per graph: the ops its last quantization re-rounded
        self.token_gptq: dict[str, list[str]] = {}  # per graph: the per-token ops GPTQ rounded, last attempt
        # bias correction of the vision graph's outputs (`output_bias`): the float graph's output means and rms, and
        # per graph the last candidate's request and shifts
        self.float_means: dict[str, dict[str, tuple[Any, float]]] = {}
        self.shifts: dict[str, tuple[tuple, dict[str, Any]]] = {}

    def quantize(
        self, float_nodes: set[str], per_token: set[str] = frozenset(), rule: str = "minmax"
    ) -> dict[str, Any]:
        """Every graph's candidate: `float_nodes` (and `target_float`) kept float, `per_token` quantized per token,
        the rest int8 by `rule` (its ranges and flags, `pue.calibration.candidates`)."""
        quantized = {}
        for name in self.prepared.float_paths:
            quantized[name], fresh = self.quantize_graph(name, float_nodes, per_token, rule)
            while fresh and self.parity is not None and self.static and self.last[name][0][0]:
                # the target backend must compute this Q/DQ graph as onnxruntime does (the fallback's ranking
                # simulates onnxruntime's arithmetic): the ops it computes differently stay float from here on
                found = self.parity.check(
                    name,
                    quantized[name],
                    self.last[name][0][0],
                    self.say,
                    float_graph=self.source_of(name, rule),
                    path=self.last[name][1],
                )
                if not found:
                    break
                self.target_float.update(found)
                quantized[name], fresh = self.quantize_graph(name, float_nodes, per_token, rule)
        self.phase_done("calibration" if self.static else "quantization")
        return quantized

    def source_of(self, name: str, rule: str) -> Path:
        """The float graph a rule quantizes (`PreparedGraphs.source_of`)."""
        return self.prepared.source_of(name, rule)

    def moment_of(self, node: str) -> Any:
        """GPTQ's Hessian: the op's input second moment on calibration tokens (None where it has no statistics)."""
        return self.prepared.stats[self.activation_of[node]].second_moment() if node in self.activation_of else None

    def gptq_rounded(self) -> int:
        """How many ops the last attempt's weights were rounded by GPTQ in, per-token ops included."""
        return sum(len(v) for v in [*self.gptq_ops.values(), *self.token_gptq.values()])

    def quantize_graph(self, name: str, float_nodes: set[str], per_token: set[str], rule: str) -> tuple[Any, bool]:
        """One graph's candidate, and whether it was quantized afresh (else the last file is reloaded)."""
        import onnx

        from pue.calibration.per_token import quantize_per_token

        gptq = GPTQ in rule
        unsigned = WIDE in rule and stores_weights_unsigned(self.options)
        split = SPLIT in rule and name in self.prepared.split_paths
        readers = READERS in rule and name in self.prepared.reader_paths
        path = self.source_of(name, rule)
        skipped = float_nodes | per_token | self.target_float
        nodes = [op.node for op in self.prepared.ops_of(name) if op.node not in skipped]
        request = (tuple(nodes), rule, split)
        fresh = not (name in self.last and self.last[name][0] == request)
        out = self._write_int8(name, path, nodes, rule, readers) if fresh else self.last[name][1]
        if fresh:
            self.gptq_ops[name] = []
        if nodes and fresh and (gptq or unsigned or (split and self.static)):
            self._rewrite(name, path, out, nodes, gptq, split, readers, unsigned)
        self.last[name] = (request, out)
        quantized = onnx.load(str(out))
        token_ops = [op for op in self.prepared.ops_of(name) if op.node in per_token - float_nodes]
        self.token_gptq[name] = []
        if token_ops and self.grouped_tokens:  # OpenVINO: int8 weights alone, per token at run time
            self.token_gptq[name] = self._weights_only(name, quantized, token_ops, path, gptq, readers)
        elif token_ops:
            done = quantize_per_token(quantized, token_ops, self.moment_of if gptq else None)
            self.token_gptq[name] = done if gptq else []
        if self.options.bias_correction and name in CORRECTED_GRAPHS and (nodes or token_ops):
            self._correct_outputs(name, quantized, path, (request, tuple(op.node for op in token_ops)))
        else:
            self.shifts.pop(name, None)  # nothing quantized here (or no correction): no shift to report
        return quantized, fresh

    def _correct_outputs(self, name: str, quantized: Any, path: Path, request: tuple) -> None:
        """`quantized`'s outputs corrected in place by the shift quantization gave them (`output_bias`): measured for
        this request (its int8 ops, rule, split and per-token ops) on calibration patches against the float graph at
        `path`, reused while the request stays the same."""
        from pue.calibration.output_bias import PATCHES, correct_outputs, output_means

        if name not in self.float_means:
            self.float_means[name] = output_means(path, self.feeds[name](PATCHES))
        if self.shifts.get(name, (None,))[0] != request:
            means = output_means(quantized, self.feeds[name](PATCHES))
            floats = self.float_means[name]
            self.shifts[name] = (request, {out: means[out][0] - floats[out][0] for out in means if out in floats})
        correct_outputs(quantized, self.shifts[name][1])

    def bias_record(self) -> dict[str, dict[str, dict[str, float]]]:
        """The last candidate's output shifts, per corrected graph and output (`output_bias.shift_record`)."""
        from pue.calibration.output_bias import shift_record

        return {
            name: shift_record(shifts, {out: rms for out, (_, rms) in self.float_means[name].items()})
            for name, (_, shifts) in self.shifts.items()
        }

    def _weights_only(self, name: str, model: Any, ops: list, path: Path, gptq: bool, readers: bool) -> list[str]:
        """`ops` of the candidate `model` rewritten in place with int8 weights alone (static INT8 for OpenVINO, which
        quantizes their activations per token at run time), rounded by GPTQ where `gptq`; returns the ops GPTQ
        rounded."""
        from pue.calibration.weights_only import quantize_weights_only

        quantize_weights_only(model, [op.node for op in ops])
        return self._gptq(name, model, ops, path, readers) if gptq else []

    def _write_int8(self, name: str, path: Path, nodes: list[str], rule: str, readers: bool) -> Path:
        """onnxruntime's quantization of `nodes` in the float graph at `path` (static Q/DQ with `rule`'s ranges, or
        dynamic), or their int8 weights alone (OpenVINO's run-time INT8, `weights_only`), written to
        `{name}.int8.onnx`; the float graph itself where no op is left to quantize."""
        from pue.calibration.int8 import quantize_dynamic_graph, quantize_static_graph
        from pue.calibration.readers import OrtReader
        from pue.calibration.weights_only import weights_only_graph

        if not nodes:  # every op of this graph is per token or float
            return path
        out = self.work / f"{name}.int8.onnx"
        wide = WIDE in rule
        if self.static:
            reader = OrtReader(self.feeds[name]())  # read lazily: one row when every range is pue's
            quantize_static_graph(
                path,
                out,
                reader,
                nodes,
                self.options.target,
                self.options.method,
                cache_path=self.work / f"{name}{'.readers' if readers else ''}.calibration.json",  # its own tensors
                ranges=self.range_rules.get(ranges_rule(rule)),
                full_weights=wide,
            )
        elif self.grouped:
            weights_only_graph(path, out, nodes)
        else:
            quantize_dynamic_graph(path, out, nodes, full_weights=wide)
        return out

    def _gptq(self, name: str, model: Any, ops: list, path: Path, readers: bool) -> list[str]:
        """`ops`' int8 weights in `model` re-rounded by GPTQ on their grids; returns the ops rounded. The split graph's
        writers keep their weights; the readers' split zeroed its readers' amplified rows (read from `path`)."""
        import onnx

        from pue.calibration.channel_split import masked_moments
        from pue.calibration.gptq import round_weights, weight_reader

        if readers and name not in self.reader_models:
            self.reader_models[name] = onnx.load(str(path), load_external_data=False)
        reader = weight_reader(self.reader_models[name] if readers else self.models[name], self.work)
        moments = masked_moments(self.moment_of, self.prepared.reader_splits[name]) if readers else self.moment_of
        cache = self.reader_gptq_cache if readers else self.gptq_cache
        return round_weights(model, ops, moments, reader, cache)

    def _rewrite(
        self, name: str, path: Path, out: Path, nodes: list[str], gptq: bool, split: bool, readers: bool, unsigned: bool
    ) -> None:
        """The quantized graph at `out` rewritten in place: its int8 weights re-rounded by GPTQ (`gptq`), (static
        Q/DQ on the split graph) the split's float columns given the writers' float inputs back, and (`unsigned`) its
        8-bit weights stored as uint8 (`pue.calibration.weight_storage`), last: GPTQ reads and writes int8 levels."""
        import onnx

        from pue.calibration.channel_split import read_float_inputs
        from pue.calibration.weight_storage import store_weights_unsigned

        rewritten = onnx.load(str(out))
        if gptq:  # re-round onnxruntime's int8 weights (`gptq`), on the same grids
            chosen = set(nodes)
            int8_ops = [op for op in self.prepared.ops_of(name) if op.node in chosen]
            self.gptq_ops[name] = self._gptq(name, rewritten, int8_ops, path, readers)
        if split and self.static:  # the float columns read the writers' float inputs, not their Q/DQ
            read_float_inputs(rewritten, self.prepared.splits[name].side_nodes)
        if unsigned:
            store_weights_unsigned(rewritten)
        onnx.save_model(rewritten, str(out))
