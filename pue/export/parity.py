"""The parity gate of every `pue-export onnx`: the bundle, run through the runtime, against the reference.

Measurements, report and failure file are `pue.fidelity`'s; this module decides what is compared: every held-out
kind (images, texts, composed), the vision features, padded batches against single runs, and a mixed batch
against separate runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pue.fidelity import PARITY, Check, GateReport, compare_for_parity
from pue.gate_set import GateSet

VISION_GATE_IMAGES = 4
VISION_PREFIX = "vision:"  # reference_outputs' keys of the vision graph's outputs


@dataclass(frozen=True)
class ParityTolerances:
    """How close the bundle must stay to the reference run in the same dtype."""

    min_cosine: float
    max_abs: float
    vision_max_abs: float
    batch_max_abs: float


TOLERANCES = {
    "float32": ParityTolerances(min_cosine=0.9999, max_abs=1e-4, vision_max_abs=1e-5, batch_max_abs=1e-5),
    # an FP16 root is gated against the reference in float16: rounding of 2^-11 per op
    "float16": ParityTolerances(min_cosine=0.999, max_abs=5e-3, vision_max_abs=5e-2, batch_max_abs=5e-3),
}


def reference_outputs(reference: Any, gate_set: GateSet) -> dict[str, np.ndarray]:
    """What the parity gate compares with, computed from the PyTorch reference before torch is freed."""
    vision = reference.vision_outputs(gate_set.images[:VISION_GATE_IMAGES])
    return {**gate_set.embed(reference), **{f"{VISION_PREFIX}{name}": value for name, value in vision.items()}}


def run_parity_gate(
    embedder: Any, reference: dict[str, np.ndarray], gate_set: GateSet, tolerances: ParityTolerances
) -> GateReport:
    """Compare bundle outputs with precomputed reference outputs (`reference_outputs`); also padded batches
    against single runs and a mixed batch against separate runs."""
    from pue.runtime import Query

    report = GateReport(PARITY, "bundle via runtime vs PyTorch reference")
    got = gate_set.embed(embedder)
    for kind in ("images", "texts", "composed", "image_sets"):
        if kind in reference or kind in got:
            compare_for_parity(
                report,
                kind,
                got.get(kind, np.zeros(0)),
                reference.get(kind, np.zeros(0)),
                tolerances.min_cosine,
                tolerances.max_abs,
            )

    vision = embedder.vision_outputs(gate_set.images[:VISION_GATE_IMAGES])
    for key, want in reference.items():
        if not key.startswith(VISION_PREFIX):
            continue
        name = key.removeprefix(VISION_PREFIX)
        got_features = vision.get(name, np.zeros(0))
        diff = float(np.max(np.abs(got_features - want))) if got_features.shape == want.shape else float("nan")
        label = "vision features" if name == "image_features" else f"vision {name}"
        report.checks.append(Check(label, "max abs diff", diff, tolerances.vision_max_abs, False))

    texts = gate_set.texts
    singles = np.concatenate([embedder.embed_texts([t]) for t in texts])
    report.checks.append(
        Check(
            "padded text batch vs single runs",
            "max abs diff",
            float(np.max(np.abs(singles - got["texts"]))),
            tolerances.batch_max_abs,
            False,
        )
    )
    queries = [
        Query(text=texts[1]),
        Query(image=gate_set.images[0]),
        Query(image=gate_set.composed_images[0], text=gate_set.composed_texts[0]),
        Query(text=texts[-1]),
    ]
    separate = [got["texts"][1], got["images"][0], got["composed"][0], got["texts"][-1]]
    if "image_sets" in got:  # the largest set that fits, as GateSet.embed chose them
        queries.insert(1, Query(images=gate_set.up_to_images(embedder.max_images_per_row).image_sets[-1]))
        separate.insert(1, got["image_sets"][-1])
    mixed = embedder.embed(queries, batch_size=len(queries))
    kinds = ", ".join("image set" if q.images is not None else q.kind for q in queries)
    report.checks.append(
        Check(
            f"mixed batch ({kinds}) vs separate runs",
            "max abs diff",
            float(np.max(np.abs(mixed - np.stack(separate)))),
            tolerances.batch_max_abs,
            False,
        )
    )
    return report
