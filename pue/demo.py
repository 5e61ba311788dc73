"""`pue-export demo`: the whole path on a tiny real checkpoint, offline, in a few minutes on 2 CPU cores.

tiny checkpoint → FP32 bundle (parity gate) → INT8 and INT8-dynamic bundles calibrated on the shipped patches
(fidelity gate) → latency and pmeb-mini reports next to the PyTorch reference → one summary table.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pue.errors import OutputExistsError

DEMO_BATCH_SIZES = (1, 8)


@dataclass
class DemoResult:
    workdir: Path
    bundles: dict[str, Path]
    latency: dict[str, Any]
    pmeb: dict[str, Any]
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per backend: gate, batch-8 latency and throughput, speedup, PMEB agreement with the reference."""
        rows = []
        latency_rows = [r for r in self.latency["results"] if r.get("batch_size") == max(DEMO_BATCH_SIZES)]
        pmeb_rows = self.pmeb.get("results", [])
        for row in latency_rows:
            name = row["name"]
            task_rows = [r for r in pmeb_rows if r.get("name") == name and r.get("prediction_agreement") is not None]
            agreement = item_agreement(task_rows)
            deltas = [abs(r["delta"]) for r in task_rows if r.get("delta") is not None]
            rows.append(
                {
                    "name": name,
                    "backend": row.get("backend"),
                    "precision": row.get("precision"),
                    "gate": self.gates.get(name, {}).get(
                        "summary", "reference" if row.get("backend") == "pytorch" else "-"
                    ),
                    "p50_ms": row.get("p50_ms"),
                    "items_per_s": row.get("items_per_s"),
                    "speedup_vs_reference": row.get("speedup_vs_reference"),
                    "pmeb_prediction_agreement": agreement,
                    "pmeb_max_abs_delta": max(deltas) if deltas else None,
                }
            )
        return rows


def item_agreement(rows: list[dict[str, Any]]) -> float | None:
    """Share of items whose prediction agrees with the reference's, over pue's own prediction lists: one list per
    (task, predictions), weighted by its queries; several metrics of one list (recall@1/5/10, accuracy/F1) and
    HOMIE's re-scoring of the same records (`homie_*`) are not counted again."""
    lists = {
        (r["task"], r["predictions"]): r
        for r in rows
        if r.get("predictions") and r.get("queries") and not str(r.get("metric", "")).startswith("homie_")
    }
    items = sum(r["queries"] for r in lists.values())
    if not items:
        return None
    return sum(r["prediction_agreement"] * r["queries"] for r in lists.values()) / items


def demo_backends(openvino_installed: bool) -> tuple[str, ...]:
    """Each bundle on its own backend, and on OpenVINO too when the `openvino` extra is installed (the INT8 bundles'
    fused attention is onnxruntime's own: the report notes why they get no OpenVINO row)."""
    return ("auto", "openvino") if openvino_installed else ("auto",)


def run_demo(
    workdir: str | Path = "pue-demo",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    iters: int = 5,
) -> DemoResult:
    from pue.benchmarks.latency import run_latency
    from pue.benchmarks.pmeb import pmeb_mini_dir
    from pue.benchmarks.pmeb.runner import run_pmeb
    from pue.benchmarks.report import write_latency_report
    from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle
    from pue.export.onnx_bundle import export_onnx_bundle
    from pue.export.tiny_models import build_tiny_model
    from pue.extras import have_extra

    say = progress or (lambda message: None)
    root = Path(workdir)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise OutputExistsError(str(root))
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = root / "checkpoint"
    bundles = {"fp32": root / "bundle-fp32", "int8": root / "bundle-int8", "int8-dynamic": root / "bundle-int8-dynamic"}

    say("[1/5] tiny LLaVA-NeXT checkpoint (random weights, real tokenizer and processor)")
    build_tiny_model(checkpoint, arch="llava_next", preset="ci")
    say("[2/5] FP32 bundle, parity gate against the PyTorch reference")
    exported = export_onnx_bundle(checkpoint, bundles["fp32"], progress=lambda m: say(f"      {m}"))
    gates = {"fp32": {"summary": "PASSED parity" if exported.gate.passed else "FAILED"}}
    for precision in ("int8", "int8-dynamic"):
        say(f"[3/5] {precision} bundle calibrated on the shipped patches, fidelity gate against FP32")
        result = quantize_bundle(
            bundles["fp32"],
            bundles[precision],
            QuantizeOptions(precision=precision, num_patches=32),
            progress=lambda m: say(f"      {m}"),
        )
        overall = result.fidelity.overall
        gates[precision] = {"summary": f"PASSED cos {overall['mean_cosine']:.4f}"}
    say("[4/5] latency: PyTorch fp32/bf16 reference and each bundle, each in its own process")
    latency = run_latency(
        list(bundles.values()),
        reference=checkpoint,
        backends=demo_backends(have_extra("openvino")),
        batch_sizes=DEMO_BATCH_SIZES,
        warmup=1,
        iters=iters,
        progress=lambda m: say(f"      {m}"),
    )
    write_latency_report(latency, root / "reports" / "latency", overwrite=True)
    say("[5/5] pmeb-mini: zero-shot, retrieval and composed tasks against the reference")
    pmeb = run_pmeb(
        list(bundles.values()),
        pmeb_mini_dir(),
        reference=checkpoint,
        report_dir=root / "reports" / "pmeb",
        cache_dir=root / "cache",
        progress=lambda m: say(f"      {m}"),
    )
    named_gates = {bundles[key].name: value for key, value in gates.items()}
    return DemoResult(root, bundles, latency, pmeb, named_gates)
