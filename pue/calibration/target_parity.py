"""Does the target backend run a Q/DQ graph as onnxruntime does? Found and repaired before any check.

The INT8 search ranks its fallback with Q/DQ simulated in float (onnxruntime's arithmetic); the check and the gate run
the target backend. Where the two compute the same Q/DQ graph differently, the search's decisions do not reach the
thing that fails. Measured: OpenVINO 2026.4's low-precision transformations move a Gemm's per-output-channel
dequantization past the Reshape that follows it (`[n·64, 64] → [n, 64, 64]`, Qwen3-VL's patch merger) with the scale
broadcast along the wrong axis: `image_features` at cosine 0.41 against onnxruntime on the same graph, the bundle's
gate 0.67, and no float fallback touches that Gemm because onnxruntime's simulation finds it harmless.

So each freshly quantized graph is run on a few calibration rows by both backends (and the float graph it was
quantized from by onnxruntime); where an output row's cosine between the backends falls under `PARITY_MIN_COSINE`
and the target is also more than `ERROR_RATIO` times further from the float graph than onnxruntime (a defect, not
another rounding), the weight ops behind it are found by halving the set of ops left in int8 (each half's other ops
read float inputs and their dequantized weights: `float_ops`), and the search keeps them in float from then on
(`fidelity.json["target_parity"]`).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pue.errors import PueError
from pue.fidelity import cosine_rows
from pue.graph_files import EXTERNAL_DATA_THRESHOLD, prune_dead, save_graph

# Row cosine between the target backend and onnxruntime on the same Q/DQ graph under which the target is taken to
# compute another function. Kernel differences on healthy graphs: 0.9997-0.9998 (a LLaVA-NeXT vision graph, its int8
# patch Conv), 1.0000 (its decoder); the defect found sat at 0.41. Loose on purpose: the gate judges accuracy.
PARITY_MIN_COSINE = 0.99
PARITY_ROWS = 2  # calibration rows per graph the two backends run
# ... and then only where the target's error against the float graph is more than this many times onnxruntime's: two
# backends may round differently and be equally far from it (a Qwen3-VL-2B-shaped decoder: 0.9966 between them)
ERROR_RATIO = 2.0
MAX_DIVERGENT_GROUPS = 8  # groups of ops found before the search gives up on the target
ONE_FILE_BYTES = EXTERNAL_DATA_THRESHOLD  # graphs this large or larger are saved with their weights beside them

Runner = Callable[[Path, list[dict[str, np.ndarray]]], list[dict[str, np.ndarray]]]


@dataclass
class Agreement:
    """How one Q/DQ graph came out on the two backends: the lowest row cosine between them and, where the float graph
    it was quantized from ran too, each one's error against it (1 − the lowest row cosine)."""

    cosine: float
    reference_error: float | None = None  # onnxruntime's
    target_error: float | None = None

    def diverges(self, threshold: float) -> bool:
        """The target computes another function: under `threshold` against onnxruntime and, where the errors are
        known, more than `ERROR_RATIO` times onnxruntime's error against the float graph and more than 1 − threshold."""
        if self.cosine >= threshold:
            return False
        if self.reference_error is None or self.target_error is None:
            return True
        return self.target_error > max(ERROR_RATIO * self.reference_error, 1.0 - threshold)

    def describe(self) -> str:
        text = f"row cosine {self.cosine:.4f} between them"
        if self.target_error is not None and self.reference_error is not None:
            text += (
                f", error against the float graph {self.target_error:.2e} vs onnxruntime's {self.reference_error:.2e}"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "cosine": round(self.cosine, 6),
            "onnxruntime_error": None if self.reference_error is None else float(f"{self.reference_error:.3g}"),
            "target_error": None if self.target_error is None else float(f"{self.target_error:.3g}"),
        }


@dataclass
class ParityRecord:
    """One graph's parity checks and what was kept in float for the target's sake."""

    graph: str
    checks: list[dict[str, Any]] = field(default_factory=list)  # each check's `Agreement`
    float_nodes: list[str] = field(default_factory=list)
    min_cosine_before: float | None = None  # of the graph that diverged first
    min_cosine_after: float | None = None  # with `float_nodes` in float
    compiles: int = 0
    seconds: float = 0.0  # spent saving, compiling and running both backends

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "checks": self.checks,
            "float_nodes": self.float_nodes,
            "min_cosine_before": self.min_cosine_before,
            "min_cosine_after": self.min_cosine_after,
            "compiles": self.compiles,
            "seconds": round(self.seconds, 1),
        }


def min_row_cosine(reference: Sequence[dict[str, np.ndarray]], target: Sequence[dict[str, np.ndarray]]) -> float:
    """The lowest cosine between matching rows (last axis) of every float output of every feed."""
    lowest = 1.0
    for ref, got in zip(reference, target, strict=True):
        for name, a in ref.items():
            if name not in got or not np.issubdtype(a.dtype, np.floating) or a.size == 0:
                continue
            b = np.asarray(got[name])
            if b.shape != a.shape:
                return -1.0
            x = a.astype(np.float64).reshape(-1, a.shape[-1] if a.ndim else 1)
            y = b.astype(np.float64).reshape(x.shape)
            both = (np.linalg.norm(x, axis=1) > 0) & (np.linalg.norm(y, axis=1) > 0)
            if not both.all() and not np.array_equal(x[~both], y[~both]):
                return -1.0  # a zero row on one side only
            if both.any():
                lowest = min(lowest, float(cosine_rows(x[both], y[both]).min()))
    return lowest


def quantized_ops(model: Any, candidates: Iterable[str]) -> list[str]:
    """Which of `candidates` (weight op names) read a DequantizeLinear in this Q/DQ graph, in graph order."""
    wanted = set(candidates)
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node if n.name in wanted and any(i in dequantized for i in n.input)]


def float_ops(model: Any, nodes: Iterable[str]) -> Any:
    """A copy of the Q/DQ graph `model` where `nodes` read float values: each input that a DequantizeLinear of a
    constant gives (weights, biases) becomes that constant dequantized, each that a Q→DQ pair gives becomes the pair's
    float input. Nodes and initializers nothing reads any more are dropped."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    wanted = set(nodes)
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name: i for i in graph.initializer}
    made: dict[str, str] = {}
    for node in graph.node:
        if node.name not in wanted:
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = producer.get(dq.input[0])
            if dq.input[0] in initializers:
                if name not in made:
                    made[name] = f"{name}_float"
                    value = _dequantize(dq, initializers, numpy_helper)
                    graph.initializer.append(numpy_helper.from_array(value, made[name]))
                node.input[index] = made[name]
            elif source is not None and source.op_type == "QuantizeLinear":
                node.input[index] = source.input[0]
    prune_dead(model.graph)
    return model


def _dequantize(dq: Any, initializers: dict[str, Any], numpy_helper: Any) -> np.ndarray:
    q = numpy_helper.to_array(initializers[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(initializers[dq.input[1]]).astype(np.float64)
    zero = (
        numpy_helper.to_array(initializers[dq.input[2]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2]
        else np.zeros_like(scale)
    )
    if scale.ndim == 1 and scale.size > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def localize(
    nodes: Sequence[str], diverges: Callable[[Sequence[str]], bool], max_groups: int = MAX_DIVERGENT_GROUPS
) -> list[list[str]]:
    """Groups of `nodes` that make the target diverge, found by halving: `diverges(S)` says whether the graph with
    only `S` in int8 diverges. Each group is one op that diverges alone, or the smallest half-split that does only
    together; groups are taken out until what is left agrees."""
    groups: list[list[str]] = []
    remaining = list(nodes)
    while remaining and diverges(remaining):
        if len(groups) >= max_groups:
            raise PueError(
                f"the target backend and onnxruntime disagree on more than {max_groups} groups of quantized ops",
                "quantize for another target, or report the backend version and this graph",
            )
        group = remaining
        while len(group) > 1:
            half, other = group[: len(group) // 2], group[len(group) // 2 :]
            if diverges(half):
                group = half
            elif diverges(other):
                group = other
            else:
                break
        groups.append(list(group))
        remaining = [n for n in remaining if n not in set(group)]
    return groups


class TargetParity:
    """Runs each freshly quantized graph on `rows` with onnxruntime and the target (`run_target`) and, where they
    disagree, finds the weight ops to keep in float for the target's sake (`check`)."""

    def __init__(
        self,
        backend: str,
        run_target: Runner,
        rows: dict[str, Callable[[], list[dict[str, np.ndarray]]]],
        work: Path,
        threshold: float = PARITY_MIN_COSINE,
        run_reference: Runner | None = None,
    ) -> None:
        self.backend = backend
        self.run_target = run_target
        self.run_reference = run_reference or run_onnxruntime
        self.rows = rows
        self.work = work
        self.threshold = threshold
        self.records: dict[str, ParityRecord] = {}
        self._rows: dict[str, list[dict[str, np.ndarray]]] = {}
        self._float: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}  # the float graphs' outputs

    def _feeds(self, graph: str) -> list[dict[str, np.ndarray]]:
        if graph not in self._rows:
            self._rows[graph] = list(self.rows[graph]())
        return self._rows[graph]

    def _float_outputs(self, graph: str, float_graph: Path | None) -> list[dict[str, np.ndarray]] | None:
        if float_graph is None:
            return None
        key = (graph, str(float_graph))
        if key not in self._float:
            self._float[key] = self.run_reference(float_graph, self._feeds(graph))
        return self._float[key]

    def _measure(
        self, graph: str, model: Any, floats: list[dict[str, np.ndarray]] | None, path: Path | None = None
    ) -> Agreement:
        """Run `model` (or, where given, the file `path` that holds it) on both backends."""
        import onnx

        record = self.records.setdefault(graph, ParityRecord(graph))
        record.compiles += 1
        started = time.perf_counter()
        feeds = self._feeds(graph)
        with tempfile.TemporaryDirectory(prefix=".pue-parity-", dir=self.work) as scratch:
            external = []
            if path is None:
                path = Path(scratch) / f"{graph}.onnx"
                # saving with external data moves the weights out of `model`: read back into it after the runs
                external = save_graph(model, path, external_data_threshold=ONE_FILE_BYTES)
            try:
                reference, target = self.run_reference(path, feeds), self.run_target(path, feeds)
            finally:
                if external:
                    onnx.load_external_data_for_model(model, scratch)
        record.seconds += time.perf_counter() - started
        agreement = Agreement(min_row_cosine(reference, target))
        if floats is not None:
            agreement.reference_error = 1.0 - min_row_cosine(floats, reference)
            agreement.target_error = 1.0 - min_row_cosine(floats, target)
        return agreement

    def check(
        self,
        graph: str,
        model: Any,
        candidates: Iterable[str],
        say: Callable[[str], None],
        float_graph: Path | None = None,
        path: Path | None = None,
    ) -> list[str]:
        """The weight ops of this Q/DQ graph to keep in float because the target computes them differently from
        onnxruntime (empty when the two agree). With `float_graph` (the graph it was quantized from), a difference
        counts only where the target is also much further from the float graph than onnxruntime is: two backends may
        round differently and be equally good (`Agreement.diverges`). `path`: the file `model` was loaded from, run as
        it is (else `model` is saved to a scratch file)."""
        floats = self._float_outputs(graph, float_graph)
        first = self._measure(graph, model, floats, path)
        record = self.records[graph]
        record.checks.append(first.to_dict())
        if not first.diverges(self.threshold):
            return []
        ops = quantized_ops(model, candidates)
        say(
            f"{graph}: {self.backend} computes this Q/DQ graph differently from onnxruntime ({first.describe()}): "
            f"finding the ops among {len(ops)} quantized ones"
        )

        def diverges(subset: Sequence[str]) -> bool:
            keep = set(subset)
            return self._measure(graph, float_ops(model, [n for n in ops if n not in keep]), floats).diverges(
                self.threshold
            )

        found = [node for group in localize(ops, diverges) for node in group]
        after = self._measure(graph, float_ops(model, found), floats) if found else first
        if record.min_cosine_before is None:
            record.min_cosine_before = first.cosine
        record.float_nodes += [n for n in found if n not in record.float_nodes]
        record.min_cosine_after = after.cosine
        say(
            f"{graph}: {len(found)} op(s) kept in float for {self.backend}: {', '.join(found) or 'none found'} "
            f"(then {after.describe()})"
        )
        if not found:
            raise PueError(
                f"{self.backend} and onnxruntime disagree on {graph}'s Q/DQ graph ({first.describe()}) and no set "
                "of its quantized weight ops explains it",
                f"quantize for another target, or report {self.backend}'s version and this graph",
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "threshold": self.threshold,
            "rows": PARITY_ROWS,
            "graphs": [record.to_dict() for record in self.records.values()],
            "float_nodes": sorted({n for r in self.records.values() for n in r.float_nodes}),
        }


def run_onnxruntime(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The graph at `path` on onnxruntime's CPU provider (the runtime's session options), one run per feed."""
    from pue.runtime.backends.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path) as runner:
        return [runner.infer(feed) for feed in feeds]


def openvino_runner(spec: Any) -> Runner:
    """Runs a graph compiled by OpenVINO for the CPU with the bundle's compile properties (the runtime's runner)."""
    from pue.runtime.backends.openvino import OpenVinoRunner, compile_config

    config = compile_config(spec, threads=None, cache=None)

    def run(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        names = [t.name for t in [*graph.input, *graph.output]]  # the ports' names as the graph gives them
        with OpenVinoRunner(path, config, tensor_names=names) as runner:
            return [runner.infer(feed) for feed in feeds]

    return run


def parity_for(spec: Any, feeds: dict[str, Callable[..., Any]], work: Path) -> TargetParity | None:
    """The parity check for a precision's target backend, or None where the target is onnxruntime itself (or cannot
    run here: TensorRT's engines are checked by `pue-export trt`'s gate)."""
    if spec.backend != "openvino":
        return None
    rows = {name: (lambda make=make: list(make(PARITY_ROWS))) for name, make in feeds.items()}
    return TargetParity("openvino", openvino_runner(spec), rows, work)


__all__ = [
    "ERROR_RATIO",
    "PARITY_MIN_COSINE",
    "Agreement",
    "ParityRecord",
    "TargetParity",
    "float_ops",
    "localize",
    "min_row_cosine",
    "openvino_runner",
    "parity_for",
    "quantized_ops",
    "run_onnxruntime",
]
