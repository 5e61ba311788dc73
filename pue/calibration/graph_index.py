"""An ONNX graph indexed for rewrites: who produces and who reads each tensor, which tensors are constants, and the
one edit the exact rewrites share (a node's constant input replaced, in a private copy when another node shares it).
The smoothing folds (`folds.py`) and the residual-stream rotation (`rotation.py`) build on it."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper, numpy_helper


class GraphIndex:
    """Producers, consumers, initializers, inputs and outputs of `model`'s graph (kept current by its edits)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.producers = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.inputs = {value.name for value in self.graph.input}
        self.outputs = {value.name for value in self.graph.output}

    def readers(self, tensor: str) -> list[Any]:
        """Who reads `tensor`'s values (Shape only reads its shape)."""
        return [n for n in self.consumers.get(tensor, []) if n.op_type != "Shape"]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer, a `Constant` output or an `Identity` of one (the exporter shares equal
        tensors that way); None for computed tensors."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Identity":
            return self.constant(node.input[0])
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def replace_constant_input(self, node: Any, index: int, value: np.ndarray, private_name: str) -> None:
        """`node.input[index]` ← `value`: in place when `node` is its initializer's only reader, else as a new
        initializer `private_name` that only `node` reads (the other readers keep the old value)."""
        name = node.input[index]
        if name in self.initializers and len(self.consumers.get(name, [])) == 1:
            self.initializers[name].CopyFrom(numpy_helper.from_array(value, name))
            return
        init = numpy_helper.from_array(value, private_name)
        self.graph.initializer.append(init)
        self.initializers[private_name] = init
        self.consumers[name].remove(node)
        self.consumers.setdefault(private_name, []).append(node)
        node.input[index] = private_name

    def drop_initializer_of(self, name: str, node: Any) -> None:
        """Remove initializer `name` where `node` was its only reader (the node now reads a rewritten copy)."""
        if name in self.initializers and self.consumers.get(name) == [node]:
            self.graph.initializer.remove(self.initializers.pop(name))


def constant_node(name: str, value: np.ndarray) -> Any:
    """A `Constant` node producing `value` as tensor `name` (the rewrites' small tensors: never weight initializers,
    so the INT8 search never quantizes them)."""
    return helper.make_node("Constant", [], [name], name=f"{name}_constant", value=numpy_helper.from_array(value, name))


__all__ = ["GraphIndex", "constant_node"]
