"""Export the wrapped sub-modules to ONNX with either exporter, and save them (external data past a threshold)."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from pue.errors import PueError
from pue.graph_files import EXTERNAL_DATA_THRESHOLD, save_graph

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"  # exports every architecture here and Qwen2-VL's towers, where dynamo fails
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}


@dataclass
class GraphExport:
    """What to export: a module, example inputs (sizes >= 2 so dynamo does not specialise), names, dynamic axes."""

    name: str
    module: object
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def export_graph(
    spec: GraphExport,
    directory: Path,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> tuple[str, list[str]]:
    """Export `spec` to `directory/<name>.onnx`; returns the graph file name and its external data files."""
    import onnx
    import torch

    if exporter not in EXPORTERS:
        raise PueError(f"unknown exporter '{exporter}'", f"choose one of: {', '.join(EXPORTERS)}")
    opset = opset or DEFAULT_OPSET[exporter]
    filename = f"{spec.name}.onnx"
    with tempfile.TemporaryDirectory(prefix="pue-export-", dir=directory.parent) as scratch:
        raw = Path(scratch) / filename
        with torch.inference_mode(False), torch.no_grad(), _quiet():
            if exporter == "torchscript":
                torch.onnx.export(
                    spec.module,
                    spec.args,
                    str(raw),
                    input_names=spec.input_names,
                    output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes,
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
            else:
                program = torch.onnx.export(
                    spec.module,
                    spec.args,
                    input_names=spec.input_names,
                    output_names=spec.output_names,
                    dynamic_shapes=_dynamic_shapes(spec),
                    opset_version=opset,
                    dynamo=True,
                    external_data=True,
                )
                program.save(str(raw), external_data=True)
        model = onnx.load(str(raw), load_external_data=True)
        _name_dynamic_dims(model, spec)
        return filename, save_graph(model, directory / filename, external_data_threshold)


def _dynamic_shapes(spec: GraphExport) -> dict[str, dict[int, object]]:
    import torch

    dims: dict[str, object] = {}
    shapes: dict[str, dict[int, object]] = {}
    for name in spec.input_names:
        axes = spec.dynamic_axes.get(name, {})
        shapes[name] = {}
        for axis, dim_name in axes.items():
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name, min=1, max=1 << 20)
            shapes[name][axis] = dims[dim_name]
    return shapes


def _name_dynamic_dims(model: object, spec: GraphExport) -> None:
    """Give every dynamic dimension the contract's name (dynamo writes s0, s1, ...)."""
    graph = model.graph  # type: ignore[attr-defined]
    for value in list(graph.input) + list(graph.output):
        axes = spec.dynamic_axes.get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        for axis, dim_name in axes.items():
            if axis < len(dims):
                dims[axis].dim_param = dim_name


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings that mean nothing to a user of pue; keep them in the log."""
    buffer = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        warnings.simplefilter("ignore")
        yield
    if buffer.getvalue().strip():
        log.debug("exporter output:\n%s", buffer.getvalue())
