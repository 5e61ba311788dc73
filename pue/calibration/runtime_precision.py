"""Runtime-precision bundles (bf16 for OpenVINO): the fp32 graphs, hard-linked, with the precision the backend must
compute in, gated by running that backend on this CPU.

Nothing in the graphs changes, so nothing is rewritten or copied: the child holds hard links to the parent's graphs
(an 8 B fp32 graph is 32 GB), its manifest names precision `bf16` for target `openvino`, and the OpenVINO backend
compiles the graphs with bf16 inference precision. The gate must measure bf16, so a CPU without native bf16 (where
OpenVINO would silently compute in f32) is refused before any work, with the CPUs that do run it. The CPU's matrix
features are recorded with the gate: a bf16 gate says something only about CPUs of that kind.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pue import __version__
from pue.bundle import Manifest, QuantizationInfo, read_manifest, write_manifest
from pue.choices import Attention, Precision
from pue.derive import Derivation, derive_bundle
from pue.errors import PueError
from pue.extras import package_versions
from pue.fidelity import FidelityThresholds, measure_fidelity
from pue.gate_set import GateSet
from pue.precisions import PrecisionKind, PrecisionSpec
from pue.runtime.cpu import cpu_info

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RuntimePrecisionResult:
    bundle: Path
    report: dict[str, Any]
    linked: list[str]
    timings: dict[str, float]


def derive_runtime_precision(
    bundle: str | Path,
    output: str | Path,
    spec: PrecisionSpec,
    thresholds: FidelityThresholds | None = None,
    heldout: Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RuntimePrecisionResult:
    """The fp32 bundle at `bundle` as a `spec` bundle at `output` (hard-linked graphs), gated against its parent."""
    from pue.runtime import Embedder
    from pue.runtime.backends.openvino import cpu_description, import_openvino, refuse_without_bf16

    say = progress or (lambda message: log.info(message))
    if spec.kind != PrecisionKind.RUNTIME:
        raise PueError(f"internal: {spec.precision} for {spec.target} is not a runtime precision")
    parent_dir = Path(bundle)
    parent_manifest = read_manifest(parent_dir)
    if parent_manifest.precision != Precision.FP32:
        raise PueError(
            f"the bundle is {parent_manifest.precision}; a {spec.precision} bundle is derived from an fp32 bundle",
            "pass the fp32 root bundle",
        )
    core = import_openvino().Core()
    refuse_without_bf16(core, f"a gated {spec.precision} bundle (the gate would measure f32 and prove nothing)")
    timings: dict[str, float] = {}
    with derive_bundle(parent_dir, output, overwrite=overwrite) as child:
        started = time.perf_counter()
        linked = _link_graphs(child)
        timings["link_s"] = time.perf_counter() - started
        say(f"linked {len(child.linked)} of {len(linked)} files from the parent (the rest copied)")
        manifest = _child_manifest(child, spec)
        write_manifest(child.staging, manifest)
        gate_set = GateSet.default(heldout)
        say(f"gate set: {gate_set.counts()}")
        started = time.perf_counter()
        with Embedder.load(parent_dir) as parent:
            reference = gate_set.embed(parent)
            parent_backend = parent.backend_name
        with Embedder.load(child.staging, backend="openvino", options={"cache_dir": False}) as candidate:
            fidelity = measure_fidelity(gate_set.embed(candidate), reference, thresholds or FidelityThresholds())
            precision = candidate.backend.inference_precision
        timings["gate_s"] = time.perf_counter() - started
        report = {
            "precision": str(spec.precision),
            "target": str(spec.target),
            "gate": fidelity.to_dict(),
            "gate_device": f"cpu (OpenVINO {package_versions(['openvino']).get('openvino')}, inference precision "
            f"{precision}; the parent through {parent_backend})",
            "cpu": {**cpu_info(), **cpu_description(core)},
            "linked": list(child.linked),
            "attention": {"mode": str(Attention.STANDARD), "graphs": {}},
        }
        child.gate(fidelity, "fidelity gate", {k: v for k, v in report.items() if k != "gate"})
        child.write_json("fidelity.json", report)
        manifest.fidelity = {
            "gate": {key: report["gate"][key] for key in ("passed", "overall", "thresholds")},
            "gate_device": report["gate_device"],
            "cpu": report["cpu"],
        }
        child.commit(manifest, ["fidelity.json"])
    say(f"wrote {output}")
    return RuntimePrecisionResult(Path(output), report, linked, timings)


def _link_graphs(child: Derivation) -> list[str]:
    """Every graph, its external weights and the tokenizer, hard-linked from the parent (copied across filesystems)."""
    parent = child.parent
    files = [parent.tokenizer.file.path]
    for graph in parent.graphs.values():
        files += [graph.file.path, *(entry.path for entry in graph.external_data)]
    for relative in files:
        child.link_from_parent(relative)
    return files


def _child_manifest(child: Derivation, spec: PrecisionSpec) -> Manifest:
    manifest = child.child_manifest(precision=str(spec.precision), target=str(spec.target))
    manifest.backend = str(spec.target)  # the backend that honours the precision: `auto` picks it
    manifest.export = dataclasses.replace(
        child.parent.export,
        quantization=QuantizationInfo(
            precision=str(spec.precision),
            target=str(spec.target),
            method="none (runtime precision: the fp32 graphs, compiled with it)",
            activations=spec.activations,
            weights=spec.weights,
            attention={"mode": str(Attention.STANDARD), "graphs": {}},
            pue=__version__,
        ),
    )
    return manifest


__all__ = ["RuntimePrecisionResult", "derive_runtime_precision"]
