"""The rounding floor of FP32 bundles: each parent measured in bf16 arithmetic (`pue.calibration.rounding_floor`) on
the held-out gate set, against its own fp32 embeddings, with the quantize gate's thresholds. What `pue-export
quantize` measures where an INT8 gate fails, for any bundle and before any quantization (BENCHMARKS.md, session 21).

    python scripts/rounding_floor.py FP32_BUNDLE [FP32_BUNDLE ...] [--heldout DIR] [--json floor.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import onnx

from pue.bundle import file_entry, read_manifest, write_manifest
from pue.calibration.rounding_floor import bf16_rounded
from pue.fidelity import FidelityThresholds, measure_fidelity
from pue.gate_set import GateSet
from pue.runtime import Embedder


def floor_of(bundle: Path, gate: GateSet) -> dict:
    started = time.perf_counter()
    with Embedder.load(bundle) as parent:
        reference = gate.embed(parent)
    with tempfile.TemporaryDirectory() as tmp:
        rounded = Path(tmp) / bundle.name
        shutil.copytree(bundle, rounded)
        manifest = read_manifest(rounded)
        for spec in manifest.graphs.values():
            model = bf16_rounded(onnx.load(str(bundle / spec.file.path)))
            for entry in [spec.file, *spec.external_data]:
                (rounded / entry.path).unlink()
            onnx.save_model(model, str(rounded / spec.file.path))  # tiny and mid-sized graphs: weights inline
            spec.file, spec.external_data = file_entry(rounded, spec.file.path), []
        write_manifest(rounded, manifest)
        with Embedder.load(rounded, backend="onnxruntime") as candidate:
            report = measure_fidelity(gate.embed(candidate), reference, FidelityThresholds())
    overall = report.overall
    return {
        "bundle": str(bundle),
        "passed": report.passed,
        "mean_cosine": round(overall["mean_cosine"], 5),
        "min_cosine": round(overall["min_cosine"], 5),
        "top1": round(overall["top1"], 3),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--heldout", type=Path, help="held-out patch folder (default: the shipped gate set)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gate = GateSet.default(args.heldout)
    rows = []
    for bundle in args.bundles:
        rows.append(floor_of(bundle, gate))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| bundle | floor | mean | min | top-1 | s |\n|---|---|---|---|---|---|")
    for r in rows:
        verdict = "pass" if r["passed"] else "FAIL"
        name = Path(r["bundle"]).name
        print(f"| {name} | {verdict} | {r['mean_cosine']} | {r['min_cosine']} | {r['top1']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
