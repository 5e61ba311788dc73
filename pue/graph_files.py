"""Writing ONNX graph files into a bundle: inline below the protobuf limit, else with one external data file.

Shared by `pue.export` (root bundles) and `pue.calibration` (quantized bundles); onnx is imported lazily.
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
