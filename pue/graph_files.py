"""Writing ONNX graph files into a bundle: inline below the protobuf limit, else with one external data file; and
dropping what a graph edit left dead.

Shared by `pue.export` (root bundles), `pue.optimize` and `pue.calibration` (derived bundles); onnx is imported
lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROTOBUF_LIMIT = 2 * 1024**3
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 1024**2  # leave room for the graph itself


def save_graph(model: Any, path: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[str]:
    """Save inline below the threshold, else with one external data file `<graph>.onnx.data` beside it."""
    import onnx

    size = model.ByteSize()  # type: ignore[attr-defined]
    if size < external_data_threshold:
        onnx.save_model(model, str(path))
        return []
    data_name = f"{path.name}.data"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    return [data_name]


def prune_dead(graph: Any) -> None:
    """Drop the nodes of `graph` (a GraphProto) whose outputs nothing reads any more, then the initializers no live
    node, subgraph or graph output reads."""
    wanted = {o.name for o in graph.output}
    live: list[Any] = []
    for node in reversed(list(graph.node)):
        if any(out in wanted for out in node.output):
            live.append(node)
            wanted.update(i for i in node.input if i)
            for attribute in node.attribute:  # subgraphs (If/Loop) read outer names too
                for sub in [attribute.g, *attribute.graphs]:
                    wanted.update(i for n in sub.node for i in n.input)
    live.reverse()
    if len(live) != len(graph.node):
        graph.ClearField("node")
        graph.node.extend(live)
    keep = [t for t in graph.initializer if t.name in wanted]
    if len(keep) != len(graph.initializer):
        graph.ClearField("initializer")
        graph.initializer.extend(keep)
