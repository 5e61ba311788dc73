"""The fidelity gate of an engine bundle: its embeddings against its parent ONNX bundle's, on the same GPU.

The parent runs in onnxruntime on the same GPU when onnxruntime has its CUDA provider (onnxruntime-gpu); with
the CPU build only, the parent runs on CPU and the report says so. Parent first, then engines: the two are never
in GPU memory together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pue.fidelity import FidelityThresholds, GateReport, measure_fidelity
from pue.gate_set import GateSet

log = logging.getLogger(__name__)


def parent_device_for(device: str) -> str:
    """`device` when onnxruntime can run the parent there (CUDA provider present), else "cpu"."""
    try:
        import onnxruntime
    except ImportError:
        return device
    return device if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"


def run_engine_gate(
    engine_dir: Path,
    parent_dir: Path,
    device: str,
    gate_set: GateSet,
    thresholds: FidelityThresholds | None = None,
    progress: Callable[[str], None] | None = None,
) -> GateReport:
    from pue.runtime import Embedder

    say = progress or log.info
    parent_device = parent_device_for(device)
    say(f"fidelity gate: parent bundle through onnxruntime on {parent_device} ({gate_set.counts()})")
    with Embedder.load(parent_dir, backend="onnxruntime", device=parent_device) as parent:
        expected = gate_set.embed(parent)
    say(f"fidelity gate: engines through TensorRT on {device}")
    with Embedder.load(engine_dir, backend="tensorrt", device=device) as engines:
        got = gate_set.embed(engines)
    report = measure_fidelity(got, expected, thresholds, compared="TensorRT engines vs parent bundle (onnxruntime)")
    report.extra.update({"engine_device": device, "parent_device": parent_device})
    if parent_device == "cpu" and device != "cpu":
        report.extra["note"] = (
            "onnxruntime has no CUDA provider here (CPU build installed): the parent ran on CPU, the engines on the GPU"
        )
    return report
