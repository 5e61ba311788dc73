"""A weight MatMul whose output rows are split by the Reshape after it, rewritten to split its input rows instead
(exact in FP32), for targets that quantize the first form wrongly.

OpenVINO 2026.4's low-precision transformations move an int8 Gemm's per-output-channel dequantization (its scale and
the u8 zero point's shift) past a following `Reshape [n·T, N] → [n, T, N]` and broadcast it as `[1, T, 1]`: along the
rows, not the channels, whenever T ≥ N (`pue.calibration.target_parity` finds it; Qwen3-VL's patch merger and its
DeepStack mergers end that way: `image_features` at cosine 0.41 against onnxruntime on the same Q/DQ graph). The
same function written with the Reshape first,

    Y = Reshape(A·W + b, S)            [n·T, K] → [n·T, N] → [n, T, N]
    Y = Reshape(A, S[:-1] ++ [K])·W + b                 [n, T, K] → [n, T, N]

leaves no Reshape between the product and its readers, so the dequantization stays on the channel axis. It is the same
arithmetic (each output row is one input row times W), so the FP32 function is unchanged (tested), and the weight op
keeps its name, weight and FLOPs: the INT8 search, its statistics and its report see the same op.

A patch Conv (kernel = its whole input, one output position per patch, as Qwen-VL's towers take patches already
cut) followed by a Reshape to `[M, Cout]` is first written as the Gemm it is, `Reshape(X, [-1, Cin·∏k])·Wᵀ + b`
(the same defect hit it one Reshape later: Qwen3-VL's tiny patch embedding at 0.9918 between the backends).

Rewritten where it is provably the same function: the op is a MatMul (or a Gemm with alpha = beta = 1, transA = 0 and
a 1-D bias) of a 2-D input by a constant 2-D weight, its output's only value reader is a Reshape (Shape readers are
given the old output's shape), and shape inference (with data propagation) says the Reshape's output has rank ≥ 3 and
last dimension N. The new input Reshape takes the old shape tensor with its last entry replaced by K, with
`allowzero = 1` where the opset has it, so that an entry 0 (copy a dimension of the input, which differs between
the two forms) fails loudly instead of copying the wrong one.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from pue.calibration.graph_index import GraphIndex, constant_node

PREFIX = "pue_hoist_"
SMALL_INITIALIZER_BYTES = 4096  # initializers up to this size keep their values for shape inference


@dataclass
class RowSplitHoist:
    """What `hoist_row_splits` rewrote, for `fidelity.json`."""

    ops: list[str] = field(default_factory=list)  # the weight ops whose output Reshape now splits their input
    declined: dict[str, str] = field(default_factory=dict)  # weight op → why it was left as it was
    convs: list[str] = field(default_factory=list)  # patch Convs written as the MatMul they are (then hoisted)

    def to_dict(self) -> dict[str, Any]:
        return {"ops": list(self.ops), "declined": dict(self.declined), "convs": list(self.convs)}


def hoist_row_splits(model: Any) -> RowSplitHoist:
    """Rewrite `model` in place (module docstring); the weight ops rewritten and those declined with a reason."""
    done = RowSplitHoist()
    graph = GraphIndex(model)
    if not any(
        (_weight(graph, node) is not None or node.op_type == "Conv") and _splits_rows(graph, node)
        for node in graph.graph.node
    ):
        return done  # shape inference (a copy of the whole graph) only where the pattern is
    shapes = _inferred_shapes(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for name in [node.name for node in graph.graph.node if node.op_type == "Conv"]:
        node = next(n for n in graph.graph.node if n.name == name)
        if _patch_conv(graph, node, shapes):
            _conv_as_matmul(graph, node, f"{PREFIX}conv{len(done.convs)}")
            done.convs.append(name)
            graph = GraphIndex(model)
    names = [node.name for node in graph.graph.node if node.op_type in ("MatMul", "Gemm")]
    for name in names:
        node = next(n for n in graph.graph.node if n.name == name)
        weight = _weight(graph, node)
        if weight is None:
            continue
        why = _why_not(graph, node, weight, shapes)
        if why is not None:
            if why:
                done.declined[node.name] = why
            continue
        _rewrite(graph, node, weight, f"{PREFIX}{len(done.ops)}", opset)
        done.ops.append(name)
        graph = GraphIndex(model)  # the rewrite reordered the graph's nodes (protobuf copied them)
    return done


def _patch_conv(graph: GraphIndex, node: Any, shapes: dict[str, list]) -> bool:
    """A Conv whose kernel covers its whole input (a ViT's patch embedding on patches already cut, as Qwen-VL's
    towers take them: one output position per patch) and whose only value reader is a Reshape to `[M, Cout]`."""
    weight = graph.constant(node.input[1])
    source = shapes.get(node.input[0])
    if weight is None or source is None or len(source) != weight.ndim or not _splits_rows(graph, node):
        return False
    if any(reader.op_type == "Shape" for reader in graph.consumers.get(node.output[0], [])):
        return False  # its [M, Cout, 1, …] shape is read: left as it is
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    spatial = list(weight.shape[2:])
    if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1] * len(spatial))):
        return False
    if any(attrs.get("pads", [0]) or [0]) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET"):
        return False
    if source[1:] != [weight.shape[1], *spatial]:
        return False
    if len(node.input) > 2 and node.input[2]:
        bias = graph.constant(node.input[2])
        if bias is None or bias.ndim != 1:
            return False
    flat = shapes.get(graph.readers(node.output[0])[0].output[0])
    return flat is not None and len(flat) == 2 and flat[-1] == weight.shape[0]


def _conv_as_matmul(graph: GraphIndex, node: Any, tag: str) -> None:
    """Conv(X, W, b) then Reshape to `[M, Cout]` ≡ Gemm(Reshape(X, [-1, Cin·∏k]), W as `[Cout, K]`, b, transB=1), or a
    MatMul by its transpose without a bias; the op keeps its name (the hoist then moves the next Reshape above it)."""
    weight = graph.constant(node.input[1])
    reshape = graph.readers(node.output[0])[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    flat = weight.reshape(weight.shape[0], -1)
    value = flat if bias else np.ascontiguousarray(flat.T)
    shape = constant_node(f"{tag}_shape", np.array([-1, flat.shape[1]], np.int64))
    rows = helper.make_node("Reshape", [node.input[0], f"{tag}_shape"], [f"{tag}_rows"], name=f"{tag}_rows")
    if bias:
        _retype(graph, node, "Gemm", [f"{tag}_rows", f"{tag}_weight", bias], value, transB=1)
    else:
        _retype(graph, node, "MatMul", [f"{tag}_rows", f"{tag}_weight"], value)
    node.output[0] = reshape.output[0]
    _splice(graph, node, reshape, [shape, rows], [])


def _retype(
    graph: GraphIndex, node: Any, op_type: str, inputs: list[str], weight: np.ndarray, **attributes: Any
) -> None:
    """`node` becomes `op_type` over `inputs`, its weight (`inputs[1]`) a new initializer holding `weight`; the old one
    goes where only `node` read it."""
    old_weight = node.input[1]
    graph.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), inputs[1]))
    node.op_type = op_type
    del node.attribute[:]
    del node.input[:]
    node.input.extend(inputs)
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attributes.items())
    graph.drop_initializer_of(old_weight, node)


def _splice(graph: GraphIndex, node: Any, reshape: Any, before: list[Any], after: list[Any]) -> None:
    """The graph without `reshape` (the op now writes its output), with `before` and `after` around `node`, in a
    topological order."""
    nodes = list(graph.graph.node)
    nodes.remove(reshape)
    position = nodes.index(node)
    nodes[position:position] = before
    nodes[position + len(before) + 1 : position + len(before) + 1] = after
    del graph.graph.node[:]
    graph.graph.node.extend(_topological(nodes, graph))


def _weightless(model: Any) -> Any:
    """A copy of `model` whose large initializers keep their type and dimensions but not their values: what shape
    inference reads of them (a decoder's weights are not copied to learn its shapes)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.name = model.graph.name
    for field_name in ("node", "input", "output", "value_info"):
        getattr(graph, field_name).extend(getattr(model.graph, field_name))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT64 or init.ByteSize() <= SMALL_INITIALIZER_BYTES:
            graph.initializer.append(init)  # shape tensors and small constants: data propagation reads them
        else:
            graph.initializer.append(onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
    return light


def _inferred_shapes(model: Any) -> dict[str, list[int | str | None]]:
    try:
        inferred = shape_inference.infer_shapes(_weightless(model), data_prop=True)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read is simply not rewritten
        return {}
    values = [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    return {
        v.name: [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim
        ]
        for v in values
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }


def _weight(graph: GraphIndex, node: Any) -> np.ndarray | None:
    """The op's weight as [K, N], or None where it has no constant 2-D weight of the form rewritten."""
    if len(node.input) < 2:
        return None
    value = graph.constant(node.input[1])
    if value is None or value.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return value
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
        return None
    return value.T if attrs.get("transB", 0) else value


def _splits_rows(graph: GraphIndex, node: Any) -> bool:
    """The op's output is read by one Reshape only (and perhaps Shape ops), and is no graph output."""
    readers = graph.readers(node.output[0])
    return len(readers) == 1 and readers[0].op_type == "Reshape" and node.output[0] not in graph.outputs


def hoist_for_target(models: dict[str, Any], backend: str | None, say: Any) -> dict[str, Any] | None:
    """For an OpenVINO INT8 bundle: every graph's row-splitting Reshapes hoisted above their weight ops, before the
    search reads the graphs (their statistics, ops and Q/DQ all see the rewritten form); None for other targets."""
    if backend != "openvino":
        return None
    done = {name: hoist_row_splits(model) for name, model in models.items()}
    for name, hoist in done.items():
        if hoist.ops:
            convs = f" ({len(hoist.convs)} patch Convs written as the MatMuls they are)" if hoist.convs else ""
            say(
                f"{name}: {len(hoist.ops)} weight ops' row-splitting Reshapes moved to their inputs{convs} "
                "(the form OpenVINO's int8 kernels compute right)"
            )
        for op, why in hoist.declined.items():
            say(f"{name}: {op}'s row-splitting Reshape kept: {why}")
    return {name: hoist.to_dict() for name, hoist in done.items()}


def _why_not(graph: GraphIndex, node: Any, weight: np.ndarray, shapes: dict[str, list]) -> str | None:
    """None: rewrite; "": not the pattern at all (nothing to report); else why a row-splitting Reshape was kept."""
    if not _splits_rows(graph, node):
        return ""
    reshape = graph.readers(node.output[0])[0]
    out_shape = shapes.get(reshape.output[0])
    if out_shape is None or len(out_shape) < 3:
        return ""
    if shapes.get(node.input[0]) is not None and len(shapes[node.input[0]]) != 2:
        return ""
    if out_shape[-1] != weight.shape[1]:
        return f"the Reshape's last dimension is {out_shape[-1]!r}, not the op's {weight.shape[1]} output channels"
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = graph.constant(node.input[2])
        if bias is None or bias.ndim != 1:
            return "its bias is not a constant vector"
    return None


def _rewrite(graph: GraphIndex, node: Any, weight: np.ndarray, tag: str, opset: int) -> None:
    output = node.output[0]
    reshape = graph.readers(output)[0]
    k = weight.shape[0]
    new: list[Any] = [
        constant_node(f"{tag}_start", np.array([0], np.int64)),
        constant_node(f"{tag}_end", np.array([-1], np.int64)),
        constant_node(f"{tag}_k", np.array([k], np.int64)),
        constant_node(f"{tag}_n", np.array([weight.shape[1]], np.int64)),
        helper.make_node(
            "Slice", [reshape.input[1], f"{tag}_start", f"{tag}_end"], [f"{tag}_lead"], name=f"{tag}_lead"
        ),
        helper.make_node("Concat", [f"{tag}_lead", f"{tag}_k"], [f"{tag}_shape"], name=f"{tag}_shape", axis=0),
        helper.make_node(
            "Reshape",
            [node.input[0], f"{tag}_shape"],
            [f"{tag}_rows"],
            name=f"{tag}_rows",
            **({"allowzero": 1} if opset >= 14 else {}),
        ),
    ]
    shape_readers = [n for n in graph.consumers.get(output, []) if n.op_type == "Shape"]
    if shape_readers:  # the old output's shape [M, N]: the input's leading dimension and N
        new += [
            helper.make_node("Shape", [node.input[0]], [f"{tag}_in_shape"], name=f"{tag}_in_shape"),
            helper.make_node("Slice", [f"{tag}_in_shape", f"{tag}_start", f"{tag}_end"], [f"{tag}_m"], name=f"{tag}_m"),
            helper.make_node("Concat", [f"{tag}_m", f"{tag}_n"], [f"{tag}_old_shape"], name=f"{tag}_old_shape", axis=0),
        ]
        for reader in shape_readers:  # Shape(Y) ≡ Identity of that shape
            reader.op_type = "Identity"
            reader.input[0] = f"{tag}_old_shape"
            del reader.attribute[:]
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else ""
    if node.op_type == "Gemm":  # a MatMul by the [K, N] weight; its bias becomes the Add below
        _retype(graph, node, "MatMul", [f"{tag}_rows", f"{tag}_weight"], weight)
    else:
        node.input[0] = f"{tag}_rows"
    if bias:
        node.output[0] = f"{tag}_product"
        tail = [helper.make_node("Add", [f"{tag}_product", bias], [reshape.output[0]], name=f"{tag}_bias")]
    else:
        node.output[0] = reshape.output[0]
        tail = []
    _splice(graph, node, reshape, new, tail)


def _topological(nodes: list[Any], graph: GraphIndex) -> list[Any]:
    """`nodes` in an order where each node follows the producers of its inputs, otherwise as given (the new shape
    nodes read tensors computed after the op, and the op's old Shape readers now read them)."""
    produced_by = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [
        {produced_by[name] for name in node.input if name in produced_by and produced_by[name] != i}
        for i, node in enumerate(nodes)
    ]
    readers: dict[int, list[int]] = {}
    for i, needs in enumerate(waiting):
        for j in needs:
            readers.setdefault(j, []).append(i)

    ready = [i for i, needs in enumerate(waiting) if not needs]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for r in readers.get(i, []):
            waiting[r].discard(i)
            if not waiting[r]:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise ValueError("the rewritten graph has a cycle")  # the rewrite never makes one; a guard, not a path
    return order


__all__ = ["PREFIX", "RowSplitHoist", "hoist_for_target", "hoist_row_splits"]
