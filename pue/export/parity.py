"""The parity gate of every `pue-export onnx`: the bundle, run through the runtime, against the reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

GATE_TEXTS = [
    "",
    "tumor",
    "H&E stained section of colonic mucosa",
    "Immunohistochemistry for a nuclear marker: brown DAB staining in most epithelial nuclei, blue hematoxylin "
    "counterstain elsewhere.",
    "Invasive ductal carcinoma, grade 2 — nests and cords of atypical cells infiltrating a desmoplastic stroma; "
    "mitoses are present (2 per 10 HPF).",
    " ".join(
        [
            "A long description of a whole-slide region: glands lined by columnar epithelium, goblet cells, "
            "lamina propria with plasma cells and lymphocytes, muscularis mucosae, and scattered vessels."
        ]
        * 4
    ),
    "Ünïcödé: ß, µm, °C, 中文, emoji 🔬",
    "line one\nline two\ttabbed",
]
COMPOSED_TEXTS = ["make it an IHC stain", "show more stroma", "increase the magnification", "add lymphocytes"]


@dataclass
class Check:
    name: str
    metric: str
    value: float
    threshold: float
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold


@dataclass
class GateReport:
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [dict(asdict(c), passed=c.passed) for c in self.checks],
            "details": self.details,
        }


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)


def compare_embeddings(
    report: GateReport, name: str, got: np.ndarray, want: np.ndarray, min_cosine: float, max_abs: float
) -> None:
    if got.shape != want.shape:
        report.checks.append(Check(f"{name} shape", f"{got.shape} vs {want.shape}", float("nan"), 0, True))
        return
    cos = cosine_rows(got, want)
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    report.checks.append(Check(name, "min cosine", float(cos.min()) if cos.size else 1.0, min_cosine, True))
    report.checks.append(Check(name, "max abs diff", diff, max_abs, False))
    report.details[name] = {"count": int(len(cos)), "mean_cosine": float(cos.mean()) if cos.size else 1.0}


def run_parity_gate(
    embedder: Any,
    reference: dict[str, np.ndarray],
    images: list[Any],
    texts: list[str],
    composed: tuple[list[Any], list[str]],
    vision_images: list[Any],
    tolerances: dict[str, float],
) -> GateReport:
    """Compare bundle outputs with precomputed reference outputs (`reference` holds images, texts, composed,
    image_features); also padded batches against single runs and a mixed batch against separate runs."""
    from pue.runtime import Query

    report = GateReport()
    min_cos, max_abs, vision_abs, batch_abs = (
        tolerances["min_cosine"],
        tolerances["max_abs"],
        tolerances["vision_max_abs"],
        tolerances["batch_max_abs"],
    )
    got_images = embedder.embed_images(images)
    got_texts = embedder.embed_texts(texts)
    got_composed = embedder.embed_composed(*composed)
    compare_embeddings(report, "images", got_images, reference["images"], min_cos, max_abs)
    compare_embeddings(report, "texts", got_texts, reference["texts"], min_cos, max_abs)
    compare_embeddings(report, "composed", got_composed, reference["composed"], min_cos, max_abs)

    features = embedder.image_features(vision_images)
    want = reference["image_features"]
    vision_diff = float(np.max(np.abs(features - want))) if features.shape == want.shape else float("nan")
    report.checks.append(Check("vision features", "max abs diff", vision_diff, vision_abs, False))

    singles = np.concatenate([embedder.embed_texts([t]) for t in texts])
    report.checks.append(
        Check(
            "padded text batch vs single runs",
            "max abs diff",
            float(np.max(np.abs(singles - got_texts))),
            batch_abs,
            False,
        )
    )
    mixed = embedder.embed(
        [
            Query(text=texts[1]),
            Query(image=images[0]),
            Query(image=composed[0][0], text=composed[1][0]),
            Query(text=texts[-1]),
        ]
    )
    separate = np.stack([got_texts[1], got_images[0], got_composed[0], got_texts[-1]])
    report.checks.append(
        Check(
            "mixed batch (text, image, composed, text) vs separate runs",
            "max abs diff",
            float(np.max(np.abs(mixed - separate))),
            batch_abs,
            False,
        )
    )
    return report
