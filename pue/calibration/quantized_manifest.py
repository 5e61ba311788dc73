"""What an INT8 or FP16 bundle's manifest says of its quantization: the gate's summary (`fidelity`), the weights'
format (`export.quantization.weights`), and where the gate ran."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pue import __version__
from pue.bundle import Manifest, QuantizationInfo, read_manifest
from pue.calibration.openvino_int8 import openvino_gate_device
from pue.calibration.staging import staged_manifest
from pue.derive import Derivation
from pue.precisions import INT8_WEIGHTS, INT8_WEIGHTS_UNSIGNED, PrecisionSpec

if TYPE_CHECKING:
    from pue.calibration.quantize_bundle import QuantizeOptions

__all__ = ["child_manifest", "gate_device", "weights_record"]


def child_manifest(child: Derivation, options: QuantizeOptions, report: dict) -> Manifest:
    """The quantized bundle's manifest: the staged graphs, the gate's summary, the quantization record."""
    written = {
        name: (spec.file.path, [e.path for e in spec.external_data])
        for name, spec in read_manifest(child.staging).graphs.items()
    }
    spec = options.spec
    manifest = staged_manifest(child, written, options.spec)
    manifest.lineage.calibration = "calibration.json"
    manifest.fidelity = {
        "gate": {
            "passed": report["gate"]["passed"],
            "overall": report["gate"]["overall"],
            "thresholds": report["gate"]["thresholds"],
        },
        "int8_flop_share": report["int8_flop_share"],
        "float_nodes": report["float_nodes"],
        "per_token_nodes": report["per_token_nodes"],
        "smoothed_groups": len(report["smoothed"]),
        "activation_ranges": (report.get("ranges") or {}).get("rule"),
        "weight_rounding": (report.get("weights") or {}).get("rounding"),
        "weight_bits": (report.get("weights") or {}).get("bits"),
        "channel_split": (report.get("channel_split") or {}).get("taken", False),
        "gate_device": report["gate_device"],
        "outliers": {k: v for k, v in report["outliers"].items() if k != "worst"},
    }
    parent = child.parent
    manifest.export = dataclasses.replace(
        parent.export,
        quantization=QuantizationInfo(
            precision=str(spec.precision),
            target=str(spec.target),
            method=str(options.method),
            activations=spec.activations,
            weights=weights_record(spec, report.get("weights") or {}),
            attention=report["attention"],
            pue=__version__,
        ),
    )
    return manifest


def weights_record(spec: PrecisionSpec, weights: dict[str, Any]) -> str:
    """What the manifest says of an INT8 bundle's weights (`export.quantization.weights`), from the search's
    `weights` record: the precision's own, or 8-bit where it keeps 7 bits (stored as uint8 for onnxruntime, as int8
    for OpenVINO: refused at load on a CPU whose int8 kernels would saturate on them)."""
    if weights.get("stored_unsigned"):
        return INT8_WEIGHTS_UNSIGNED
    if weights.get("widened"):
        return INT8_WEIGHTS
    return spec.weights


def gate_device(spec: PrecisionSpec) -> str:
    """Where the gate ran: the backend the entry names (OpenVINO for its target), else onnxruntime, on the CPU."""
    return openvino_gate_device(spec) if spec.backend == "openvino" else "cpu (onnxruntime)"
