"""Rotating the language model's residual stream (QuaRot / SpinQuant style), exactly in FP32.

An RMSNorm without its gain commutes with any orthogonal Q: ‖xQ‖ = ‖x‖, so norm(xQ) = norm(x)·Q. With the gains
folded into the weights that read the norms (W ← diag(g)·W), the whole residual stream can live in a rotated
basis: every weight that reads it becomes Qᵀ·W (q/k/v, gate/up), every weight that writes it W·Q (o_proj,
down_proj, their biases, the token embedding table), and the function is unchanged. A rotation spreads a few
outlier channels (norm gains of 20-1000×, massive activations) over all channels, so a per-tensor INT8 scale is
no longer set by one channel.

Where the decoder graph meets the outside world the basis is made explicit:

- `image_features` enters in the model's own basis and is rotated at the decoder's input by an inserted
  `MatMul` (`pue_rotation_image_features`): the vision graph stays the parent's, `Embedder.image_features`
  and the graph contract keep meaning the projector's output, and calibration feeds for the decoder (computed
  by the parent's vision graph) are the right ones. Cost: one H×H product per image token.
- the pooled row is rotated back (`pue_rotation_undo`, a `MatMul` by Qᵀ) before the final RMSNorm, whose gain
  stays where it is; with the pooled last layer that product runs on one row per item.

Q is a randomized Hadamard matrix H·diag(±1)/√n when the width is a power of two, otherwise a seeded random
orthogonal matrix (QR of a Gaussian matrix, signs fixed so it is Haar-distributed). Every rotation here is
folded into a dense weight or applied as a dense `MatMul`, so a Hadamard's fast transform would buy nothing; its
only advantage is the flattest possible spread (entries all ±1/√n), which the random matrix approaches.

Only the language model is rotated: the vision tower's LayerNorm subtracts the mean, which does not commute with
a rotation until the centring is folded into the writers (SliceGPT); it is left for later.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from pue.calibration.graph_index import GraphIndex
from pue.errors import PueError

PREFIX = "pue_rotation_"
IMAGE_FEATURES = "image_features"
#: ops that move rows of the residual stream around without mixing its channels (the last axis). Reshape and
#: Flatten are taken to keep the last axis (pue's exported decoders do); a graph where they do not fails the FP32
#: check that `rotate_for_int8` runs before anything is quantized.
ROW_OPS = {"Cast", "Identity", "Gather", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass
class RmsNorm:
    """One RMSNorm of the graph: `residual` (its input), the gain `Mul` and the gain vector."""

    residual: str
    internal: list[str]  # the norm's Pow and x·rsqrt Mul nodes (they read `residual`)
    gain_node: str
    gain_input: int  # which input of the gain Mul is the gain
    gain: np.ndarray
    output: str


@dataclass
class RotationSummary:
    """What `rotate_decoder` did, for `fidelity.json`."""

    width: int
    kind: str  # "randomized-hadamard" | "random-orthogonal" | "identity" (gains folded only)
    seed: int
    norms_folded: int
    readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    biases: list[str] = field(default_factory=list)
    embedding: list[str] = field(default_factory=list)
    inserted: list[str] = field(default_factory=list)
    check_min_cosine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RotationError(PueError):
    """The decoder graph reads or writes its residual stream in a way a rotation cannot be folded into."""


def hadamard(width: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of a power-of-two width (entries ±1)."""
    if width < 1 or width & (width - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two width, got {width}")
    matrix = np.ones((1, 1))
    while matrix.shape[0] < width:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def orthogonal_matrix(width: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """A seeded orthogonal matrix (float64) and its kind: randomized Hadamard if `width` is a power of two."""
    rng = np.random.default_rng(seed)
    if width & (width - 1) == 0:
        signs = rng.choice([-1.0, 1.0], size=width)
        return signs[:, None] * hadamard(width) / np.sqrt(width), "randomized-hadamard"
    q, r = np.linalg.qr(rng.standard_normal((width, width)))
    return q * np.sign(np.diag(r))[None, :], "random-orthogonal"


class _Graph(GraphIndex):
    """The graph index with the edits a rotation needs."""

    def weight(self, node: Any, index: int) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[node.input[index]]).astype(np.float64)

    def set_weight(self, node: Any, index: int, value: np.ndarray) -> None:
        """Replace `node`'s initializer input; a copy is made when another node shares it."""
        name = node.input[index]
        array = value.astype(numpy_helper.to_array(self.initializers[name]).dtype)
        self.replace_constant_input(node, index, array, f"{PREFIX}{name}_{node.name}".replace("/", "_"))

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        init = numpy_helper.from_array(value.astype(np.float32), name)
        self.graph.initializer.append(init)
        self.initializers[name] = init
        return name

    def insert_matmul(self, source: str, matrix: np.ndarray, name: str, readers: list[Any]) -> str:
        """`source @ matrix` as a new node before the first of `readers`, which are rewired to read it.

        The matrix is a `Constant` node, not an initializer: the INT8 search (which quantizes weight
        initializers' MatMuls) leaves these exact products in float and out of its FLOP share.
        """
        matrix_name, output = f"{name}_matrix", f"{name}_output"
        constant = helper.make_node(
            "Constant",
            [],
            [matrix_name],
            name=f"{name}_constant",
            value=numpy_helper.from_array(matrix.astype(np.float32), matrix_name),
        )
        node = helper.make_node("MatMul", [source, matrix_name], [output], name=name)
        nodes = list(self.graph.node)
        position = 0 if source in self.inputs else nodes.index(self.producers[source]) + 1
        self.graph.node.insert(position, node)
        self.graph.node.insert(position, constant)
        for reader in readers:
            for i, value in enumerate(reader.input):
                if value == source:
                    reader.input[i] = output
        return name


def find_rms_norms(model: Any) -> list[RmsNorm]:
    """Every RMSNorm (x · 1/√(mean(x²)+ε) · g) of the graph, in graph order."""
    graph = _Graph(model)
    return _rms_norms(graph)


def _rms_norms(graph: _Graph) -> list[RmsNorm]:
    norms = []
    for node in graph.graph.node:
        if node.op_type != "ReduceMean":
            continue
        power = graph.producers.get(node.input[0])
        exponent = None if power is None or power.op_type != "Pow" else graph.constant(power.input[1])
        if exponent is None or float(np.asarray(exponent).reshape(-1)[0]) != 2.0:
            continue
        residual = power.input[0]
        scaled = [
            c for c in graph.consumers.get(residual, []) if c.op_type == "Mul" and graph.constant(c.input[1]) is None
        ]
        scaled = [c for c in scaled if graph.constant(c.input[0]) is None]
        if len(scaled) != 1:
            raise RotationError(
                f"RMSNorm at {node.name}: expected one x·rsqrt Mul reading {residual}, found {len(scaled)}"
            )
        out = scaled[0].output[0]
        following = graph.consumers.get(out, [])
        if len(following) == 1 and following[0].op_type == "Cast":
            out = following[0].output[0]
            following = graph.consumers.get(out, [])
        gains = [
            (c, i, graph.constant(c.input[i]))
            for c in following
            if c.op_type == "Mul"
            for i in (0, 1)
            if graph.constant(c.input[i]) is not None
        ]
        if len(following) != 1 or len(gains) != 1 or np.asarray(gains[0][2]).ndim != 1:
            raise RotationError(
                f"RMSNorm at {node.name}: expected its output to be multiplied by one gain vector",
                "only Llama-style RMSNorm (x · rsqrt(mean(x²)+ε) · g) can be rotated",
            )
        gain_node, index, gain = gains[0]
        norms.append(RmsNorm(residual, [power.name, scaled[0].name], gain_node.name, index, gain, gain_node.output[0]))
    return norms


def stream_norms(norms: list[RmsNorm]) -> list[RmsNorm]:
    """The norms of the residual stream: those as wide as the last one (the final norm before pooling). Narrower
    ones normalise per attention head (Qwen3's q_norm / k_norm read q_proj / k_proj outputs, which a rotation of the
    stream leaves unchanged: those projections absorb it)."""
    if not norms:
        return []
    width = int(norms[-1].gain.shape[0])
    return [norm for norm in norms if int(norm.gain.shape[0]) == width]


def _readers(graph: _Graph, tensor: str) -> tuple[list[Any], list[Any]]:
    """The weight MatMuls that read `tensor` through row-moving ops, and every other op that reads it."""
    found, others, stack = [], [], [tensor]
    while stack:
        current = stack.pop()
        for node in graph.consumers.get(current, []):
            if node.op_type == "MatMul" and node.input[0] == current and node.input[1] in graph.initializers:
                found.append(node)
            elif node.op_type in ROW_OPS and node.input[0] == current and not _mixes_channels(node):
                stack.extend(node.output)
            elif node.op_type == "Shape":
                continue
            else:
                others.append(node)
    return found, others


def _mixes_channels(node: Any) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and axis == -1


def _residual_sources(graph: _Graph, starts: list[str]) -> tuple[set[str], dict[str, list[Any]]]:
    """Walk back from the norm inputs: every tensor of the residual stream, and what writes it, by role."""
    stream: set[str] = set()
    roles: dict[str, list[Any]] = {"writers": [], "biases": [], "embedding": [], "inputs": []}
    stack = list(starts)
    while stack:
        tensor = stack.pop()
        if tensor in stream:
            continue
        stream.add(tensor)
        if tensor in graph.inputs:
            if tensor != IMAGE_FEATURES:
                raise RotationError(f"graph input {tensor} adds into the residual stream")
            roles["inputs"].append(tensor)
            continue
        node = graph.producers.get(tensor)
        if node is None:
            raise RotationError(f"{tensor} joins the residual stream from nowhere (an initializer?)")
        op = node.op_type
        if op == "MatMul" and node.input[1] in graph.initializers:
            roles["writers"].append(node)
        elif op == "Gather" and node.input[0] in graph.initializers:
            roles["embedding"].append(node)
        elif op == "Add":
            constants = [i for i in (0, 1) if graph.constant(node.input[i]) is not None]
            if constants:
                if node.input[constants[0]] not in graph.initializers:
                    raise RotationError(f"the bias of {node.name} is not an initializer")
                roles["biases"].append((node, constants[0]))
                stack.append(node.input[1 - constants[0]])
            else:
                stack.extend(node.input[:2])
        elif op == "Where":
            stack.extend(node.input[1:3])
        elif op in ROW_OPS and not _mixes_channels(node):
            stack.append(node.input[0])
        else:
            raise RotationError(f"{op} {node.name} writes the residual stream; no rotation fold is known for it")
    return stream, roles


def rotate_decoder(model: Any, seed: int = 0, identity: bool = False) -> RotationSummary:
    """Fold the RMSNorm gains and an orthogonal rotation of the residual stream into `model` (in place).

    The FP32 function is unchanged up to rounding (the caller checks it with `rotation_cosine`). `identity`:
    fold the gains only (Q = I), to see which outliers the gains alone put there.
    """
    graph = _Graph(model)
    norms = stream_norms(_rms_norms(graph))
    if not norms:
        raise RotationError("no RMSNorm found in the decoder graph", "rotation needs a Llama-style language model")
    width = int(norms[0].gain.shape[0])
    readers, others = {}, {}
    for norm in norms:
        readers[norm.gain_node], others[norm.gain_node] = _readers(graph, norm.output)
    finals = [n for n in norms if not readers[n.gain_node]]
    if len(finals) != 1:
        raise RotationError(f"expected one final RMSNorm (read by no weight), found {len(finals)}")
    final = finals[0]
    for norm in norms:
        if norm is not final and others[norm.gain_node]:
            node = others[norm.gain_node][0]
            raise RotationError(
                f"{node.op_type} {node.name} reads the output of the RMSNorm {norm.gain_node}: only weight MatMuls "
                "(through row gathers and reshapes) can take its folded gain and rotation"
            )
    stream, roles = _residual_sources(graph, [n.residual for n in norms])
    _check_stream_readers(graph, stream, norms)

    q, kind = (np.eye(width), "identity") if identity else orthogonal_matrix(width, seed)
    summary = RotationSummary(width, kind, seed, len(norms) - 1)
    for index, norm in enumerate(n for n in norms if n is not final):
        gain = norm.gain.astype(np.float64)
        for node in readers[norm.gain_node]:
            weight = graph.weight(node, 1)
            graph.set_weight(node, 1, q.T @ (gain[:, None] * weight))
            summary.readers.append(node.name)
        gain_node = next(n for n in graph.graph.node if n.name == norm.gain_node)
        gain_node.input[norm.gain_input] = graph.add_initializer(f"{PREFIX}gain_{index}", np.ones(width))
    for node in roles["writers"]:
        _check_width(graph, node, 1, width)
        graph.set_weight(node, 1, graph.weight(node, 1) @ q)
        summary.writers.append(node.name)
    for node, index in roles["biases"]:
        graph.set_weight(node, index, graph.weight(node, index) @ q)
        summary.biases.append(node.name)
    for node in roles["embedding"]:
        _check_width(graph, node, 0, width)
        graph.set_weight(node, 0, graph.weight(node, 0) @ q)
        summary.embedding.append(node.name)
    for name in roles["inputs"]:
        readers_of_input = list(graph.consumers.get(name, []))
        summary.inserted.append(graph.insert_matmul(name, q, f"{PREFIX}image_features", readers_of_input))
    final_readers = [n for n in graph.graph.node if n.name in final.internal]
    summary.inserted.append(graph.insert_matmul(final.residual, q.T, f"{PREFIX}undo", final_readers))
    return summary


def _check_width(graph: _Graph, node: Any, index: int, width: int) -> None:
    shape = tuple(graph.initializers[node.input[index]].dims)
    if len(shape) != 2 or shape[1] != width:
        raise RotationError(f"{node.name} writes the residual stream with a weight of shape {shape}, not [*, {width}]")


def _check_stream_readers(graph: _Graph, stream: set[str], norms: list[RmsNorm]) -> None:
    """Every consumer of a residual tensor is a norm, moves the stream on, or only reads its shape."""
    internal = {name for norm in norms for name in norm.internal}
    for tensor in stream:
        for node in graph.consumers.get(tensor, []):
            if node.op_type == "Shape" or node.name in internal or any(o in stream for o in node.output):
                continue
            raise RotationError(
                f"{node.op_type} {node.name} reads the residual stream ({tensor}) other than through an RMSNorm",
                "rotation can only be folded where every reader of the stream is normed first",
            )


def rotation_cosine(original: Any, rotated: Any, feeds: list[dict[str, np.ndarray]]) -> float:
    """The minimum cosine between the two graphs' outputs over `feeds` (onnxruntime, CPU).

    Each graph is a ModelProto or the path of an .onnx file.
    """
    import onnxruntime as ort

    sessions = [
        ort.InferenceSession(
            m if isinstance(m, (str, Path)) else m.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        for m in (original, rotated)
    ]
    worst = 1.0
    for feed in feeds:
        a, b = (s.run(None, feed)[0].reshape(len(feed[next(iter(feed))]), -1).astype(np.float64) for s in sessions)
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        worst = min(worst, float(cosine.min()))
    return worst


MIN_COSINE = 0.99999  # the rotated FP32 decoder against its parent, on calibration rows
#: `auto` rotates when a normed decoder activation's max/median channel is at least this with the gains folded out
CHANNEL_THRESHOLD = 20.0
CHECK_SAMPLES = 8


def rotate_for_int8(
    models: dict[str, Any],
    decoder_path: str | Path,
    decoder_feeds: Callable[[int], Any],
    mode: str,
    seed: int = 0,
    samples: int = CHECK_SAMPLES,
) -> dict[str, Any]:
    """`pue-export quantize --rotate`: rotate `models["decoder"]` in place when `mode` asks for it.

    `decoder_path` is the parent's FP32 decoder (the check's reference); `decoder_feeds(n)` gives its first n
    calibration rows. The rotated graph must match the parent (minimum cosine ≥ MIN_COSINE) or nothing is done
    and an error says so. Returns what `fidelity.json` records: the decision, the channel outlier ratios at the
    normed activations before and after, the check's cosine and the rotation itself.
    """
    from pue.calibration.graph_ops import weight_ops
    from pue.calibration.outliers import collect_outliers
    from pue.choices import Rotate, parse_choice

    mode = parse_choice(Rotate, mode, "--rotate")
    if mode == Rotate.OFF:
        return {"mode": str(mode), "applied": False}
    decoder = models["decoder"]
    rows = list(decoder_feeds(samples))
    graph = _Graph(decoder)
    normed = {node.name for norm in stream_norms(_rms_norms(graph)) for node in _readers(graph, norm.output)[0]}

    def worst_channel_ratio(model: Any) -> float:
        ops = [op for op in weight_ops(model, "decoder") if op.node in normed]
        return max((t.channel_ratio for t in collect_outliers(model, ops, rows)), default=0.0)

    def rotated(model: Any, **kwargs: Any) -> RotationSummary:
        try:
            return rotate_decoder(model, **kwargs)
        except RotationError as error:
            raise RotationError(
                f"--rotate {mode}: this decoder's residual stream cannot be rotated: {error.message}",
                "quantize with --rotate off; smoothing, per-token handling and the float fallback still apply",
            ) from error

    before = worst_channel_ratio(decoder)
    gains_folded = copy.deepcopy(decoder)
    rotated(gains_folded, identity=True)
    without_gains = worst_channel_ratio(gains_folded)
    del gains_folded
    record: dict[str, Any] = {
        "mode": str(mode),
        "channel_ratio_before": before,
        "channel_ratio_without_gains": without_gains,
    }
    if mode == Rotate.AUTO and without_gains < CHANNEL_THRESHOLD:
        why = (
            f"the normed decoder activations' channel ratio is {before:.1f}, {without_gains:.1f} without the norm "
            f"gains (< {CHANNEL_THRESHOLD:g}): what outliers there are come from the gains, and a rotation would fold "
            "them into the weights and spread every writer's int8 error onto the channels those gains amplify"
        )
        return dict(record, applied=False, why=why)
    summary = rotated(decoder, seed=seed)
    summary.check_min_cosine = rotation_cosine(decoder_path, decoder, rows)
    if summary.check_min_cosine < MIN_COSINE:
        raise RotationError(
            f"the rotated FP32 decoder moved the embedding: minimum cosine {summary.check_min_cosine:.7f} against "
            f"the parent on {len(rows)} calibration rows, expected >= {MIN_COSINE}",
            "quantize with --rotate off and report the graph",
        )
    return dict(record, applied=True, channel_ratio_after=worst_channel_ratio(decoder), rotation=summary.to_dict())


__all__ = [
    "MIN_COSINE",
    "RmsNorm",
    "RotationError",
    "RotationSummary",
    "find_rms_norms",
    "hadamard",
    "orthogonal_matrix",
    "rotate_decoder",
    "rotate_for_int8",
    "rotation_cosine",
]
