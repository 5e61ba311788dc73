"""Where a smoothing scale can be folded exactly into the graph's constants (issue 14, item 1).

Smoothing divides a weight op's input channels by s and multiplies the op's weight rows by s. The 1/s has to go
somewhere; it costs nothing when the op that PRODUCES the input is linear per channel in a constant:

- `norm-gain`: x·g (an RMSNorm's gain `Mul`): g ← g / s (q/k/v from the input norm, gate/up from the
  post-attention norm, the final norm's readers);
- `layernorm`: a `LayerNormalization`'s scale and bias both ← / s (the vision tower's layer_norm1 → q/k/v,
  layer_norm2 → fc1);
- `up_proj`: act(gate)·up, where `up` is a MatMul (+ bias) read only by that product: up's weight columns and
  bias ← / s (down_proj's input);
- `v_proj`: attention's output is softmax(…)·V per head, linear in V's channels: v_proj's weight columns and
  bias ← / s (o_proj / out_proj's input). With grouped-query attention every query head sharing a KV head reads
  the same V channels, so s is tied across them (geometric mean over the group; `FoldSite.tie`).

The FP32 function is unchanged up to rounding (tests/calibration/test_folds.py, per case). An input produced any
other way (after a GELU: the vision MLP's fc2, the projector's linear_2; the projector's linear_1, which reads a raw
hidden state) has no fold: smoothing there inserts an explicit per-channel `Mul` (`pue.calibration.smoothing`),
one multiply per input element, against 2·N_out multiply-adds per element in the MatMul it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pue.calibration.graph_index import GraphIndex

PREFIX = "pue_fold_"
PASS_THROUGH = {"Reshape", "Transpose"}  # attention output → o_proj input: channels moved, not mixed
V_PATH = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Identity"}  # v_proj → attention (repeat_kv included)


@dataclass
class FoldSite:
    """A producer that can take 1/s exactly: `tie(s)` makes s one it can carry, `apply(s)` divides by it."""

    kind: str
    node: str
    tie: Callable[[np.ndarray], np.ndarray]
    apply: Callable[[np.ndarray], None]


class _Index(GraphIndex):
    def only_read_by(self, tensor: str, node: Any) -> bool:
        return tensor not in self.outputs and [n.name for n in self.readers(tensor)] == [node.name]

    def divide_input(self, node: Any, index: int, scale: np.ndarray, axis: int = -1) -> None:
        """node.input[index] ← its constant / scale along `axis`, in a private copy when anything else reads it."""
        value = self.constant(node.input[index])
        assert value is not None, f"{node.name} input {index} is not a constant"
        shape = [1] * value.ndim
        shape[axis] = -1
        new = (value.astype(np.float64) / scale.reshape(shape)).astype(value.dtype)
        self.replace_constant_input(node, index, new, f"{PREFIX}{node.name}_{index}".replace("/", "_"))


def _same(scale: np.ndarray) -> np.ndarray:
    return scale


def find_fold(
    model: Any, activation: str, readers: set[str], channels: int, layout: dict[str, Any] | None = None
) -> FoldSite | None:
    """The exact fold for smoothing `activation` (`channels` wide, read by the weight ops named `readers` and by
    Shape ops only), if there is one. `layout`: the graph's attention heads (`export.attention`), for `v_proj`."""
    index = _Index(model)
    if activation in index.outputs or {n.name for n in index.readers(activation)} != readers:
        return None
    producer = index.producers.get(activation)
    if producer is None:
        return None
    if producer.op_type == "LayerNormalization":
        return _layernorm(index, producer, channels)
    if producer.op_type == "Mul":
        return _norm_gain(index, producer, channels) or _up_proj(index, producer, channels)
    if producer.op_type in PASS_THROUGH and layout:
        return _v_proj(index, activation, channels, layout)
    return None


def _norm_gain(index: _Index, mul: Any, channels: int) -> FoldSite | None:
    for i in (0, 1):
        gain = index.constant(mul.input[i])
        if gain is not None and gain.shape == (channels,) and index.constant(mul.input[1 - i]) is None:
            return FoldSite("norm-gain", mul.name, _same, lambda s, i=i: index.divide_input(mul, i, s))
    return None


def _layernorm(index: _Index, norm: Any, channels: int) -> FoldSite | None:
    constants = [index.constant(name) for name in norm.input[1:3] if name]
    if any(c is None or c.shape != (channels,) for c in constants):
        return None
    axis = next((a.i for a in norm.attribute if a.name == "axis"), -1)
    if axis != -1:
        return None

    def apply(scale: np.ndarray) -> None:
        for i in range(1, len(norm.input)):
            if norm.input[i]:
                index.divide_input(norm, i, scale)

    return FoldSite("layernorm", norm.name, _same, apply)


def _linear_writer(index: _Index, tensor: str, reader: Any, width: int) -> tuple[Any, Any | None] | None:
    """(MatMul, bias Add or None) whose output is `tensor`, read only by `reader`, with a private [*, width]
    weight."""
    node = index.producers.get(tensor)
    if node is None or not index.only_read_by(tensor, reader):
        return None
    add = None
    if node.op_type == "Add":
        sides = [index.constant(name) is not None for name in node.input[:2]]
        if sides.count(True) != 1 or index.constant(node.input[sides.index(True)]).shape != (width,):
            return None
        add, computed = node, node.input[sides.index(False)]
        node = index.producers.get(computed)
        if node is None or not index.only_read_by(computed, add):
            return None
    if node.op_type != "MatMul" or node.input[1] not in index.initializers:
        return None
    if len(index.consumers.get(node.input[1], [])) != 1 or list(index.initializers[node.input[1]].dims)[1:] != [width]:
        return None
    return node, add


def _divide_writer(index: _Index, writer: tuple[Any, Any | None], scale: np.ndarray) -> None:
    matmul, add = writer
    index.divide_input(matmul, 1, scale)
    if add is not None:
        index.divide_input(add, 0 if index.constant(add.input[0]) is not None else 1, scale)


def _up_proj(index: _Index, mul: Any, channels: int) -> FoldSite | None:
    if mul.input[0] == mul.input[1]:
        return None
    for i in (0, 1):
        writer = _linear_writer(index, mul.input[i], mul, channels)
        if writer is not None:
            return FoldSite("up_proj", writer[0].name, _same, lambda s, w=writer: _divide_writer(index, w, s))
    return None


def _v_proj(index: _Index, activation: str, channels: int, layout: dict[str, Any]) -> FoldSite | None:
    """o_proj's input, back through the heads' reshapes to the attention product probabilities·V (linear in each
    of V's channels whatever the probabilities are: V is read by nothing else), and back through V's reshapes and
    repeat to v_proj."""
    heads, head_dim = int(layout["heads"]), int(layout["head_dim"])
    kv_heads = int(layout.get("kv_heads") or heads)
    if channels != heads * head_dim or heads % kv_heads:
        return None
    tensor = activation
    node = index.producers.get(tensor)
    while node is not None and node.op_type in PASS_THROUGH:
        if tensor != activation and len(index.readers(tensor)) != 1:
            return None
        tensor = node.input[0]
        node = index.producers.get(tensor)
    if node is None or node.op_type != "MatMul" or len(index.readers(tensor)) != 1:
        return None
    if node.input[1] in index.initializers or index.constant(node.input[0]) is not None:
        return None
    attention, value = node, node.input[1]
    reader = attention
    producer = index.producers.get(value)
    while producer is not None and producer.op_type in V_PATH:
        if len(index.readers(value)) != 1:
            return None
        reader, value = producer, producer.input[0]
        producer = index.producers.get(value)
    writer = _linear_writer(index, value, reader, kv_heads * head_dim)
    if writer is None:
        return None
    group = heads // kv_heads

    def tie(scale: np.ndarray) -> np.ndarray:
        """Query heads h of one KV head (h // group) share V's channels: one scale per KV channel."""
        per_head = np.log(scale.astype(np.float64)).reshape(kv_heads, group, head_dim).mean(axis=1, keepdims=True)
        return np.exp(np.repeat(per_head, group, axis=1)).reshape(-1).astype(scale.dtype)

    def apply(scale: np.ndarray) -> None:
        _divide_writer(index, writer, scale.reshape(kv_heads, group, head_dim)[:, 0, :].reshape(-1))

    return FoldSite("v_proj", writer[0].name, tie, apply)


__all__ = ["FoldSite", "find_fold"]
