"""The accuracy gate of every lower-precision bundle: its embeddings against its FP32 parent's.

Random tiny models make different tiles look alike (mean pairwise cosine ~0.8), so a cosine threshold alone
proves little: the gate also asks that each item's new embedding retrieves its own FP32 twin first among all
held-out items, and reports the cosine after removing the FP32 mean embedding (what distinguishes items).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pue.errors import PueError

# Texts the gate uses: never used for calibration (calibration captions come from pue/data/corpus.txt).
GATE_TEXTS = [
    "",
    "benign",
    "Lymph node with metastatic carcinoma in the subcapsular sinus.",
    "Well-differentiated adenocarcinoma forming back-to-back glands with cribriform areas.",
    "Normal colonic mucosa: straight crypts, abundant goblet cells, no dysplasia.",
    "Strong membranous HER2 staining in more than ten percent of invasive tumour cells (score 3+).",
    "Fatty tissue with thin fibrous septa and a few small vessels; no atypia identified.",
    "Necrotic debris surrounded by a rim of viable pleomorphic tumour cells with frequent mitoses.",
    "Ki-67 labelling index of roughly forty percent in the hot spot.",
    "Chronic inflammation with lymphoid aggregates at the base of the mucosa " * 6,
]
GATE_MODIFIERS = [
    "as an immunohistochemistry stain",
    "with more inflammatory cells",
    "at lower magnification",
    "without the background glass",
    "with denser stroma",
    "as H&E",
]


@dataclass
class GateThresholds:
    mean_cosine: float = 0.995
    min_cosine: float = 0.98
    top1: float = 0.98


@dataclass
class GateSet:
    """Held-out items: images, texts, composed (image, modifier) pairs."""

    images: list[Any]
    texts: list[str]
    composed_images: list[Any]
    composed_texts: list[str]

    @classmethod
    def default(cls, heldout: str | Path | None = None) -> GateSet:
        from pue.calibration.sources import list_images

        if heldout is None:
            from pue.data import patch_set

            images: list[Any] = list(patch_set("heldout"))
        else:
            images = list(list_images(Path(heldout)))
        if len(images) < 4:
            raise PueError(
                f"the gate needs at least 4 held-out images, found {len(images)}",
                "pass a --heldout folder with more patches",
            )
        composed = images[: len(GATE_MODIFIERS)]
        return cls(images, list(GATE_TEXTS), composed, list(GATE_MODIFIERS[: len(composed)]))

    def embed(self, embedder: Any) -> dict[str, np.ndarray]:
        return {
            "images": embedder.embed_images(self.images),
            "texts": embedder.embed_texts(self.texts),
            "composed": embedder.embed_composed(self.composed_images, self.composed_texts),
        }


@dataclass
class FidelityReport:
    thresholds: GateThresholds
    per_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)
    cosines: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        o, t = self.overall, self.thresholds
        return bool(o["mean_cosine"] >= t.mean_cosine and o["min_cosine"] >= t.min_cosine and o["top1"] >= t.top1)

    def failures(self) -> list[str]:
        o, t = self.overall, self.thresholds
        out = []
        if o["mean_cosine"] < t.mean_cosine:
            out.append(f"mean cosine {o['mean_cosine']:.4f} < {t.mean_cosine}")
        if o["min_cosine"] < t.min_cosine:
            out.append(f"min cosine {o['min_cosine']:.4f} < {t.min_cosine}")
        if o["top1"] < t.top1:
            out.append(f"top-1 self-retrieval {o['top1']:.3f} < {t.top1}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "thresholds": asdict(self.thresholds),
            "overall": self.overall,
            "per_kind": self.per_kind,
            "cosines": self.cosines,
            **self.extra,
        }


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def retrieval_agreement(candidate: np.ndarray, parent: np.ndarray, k: int) -> float:
    """Share of items whose candidate embedding finds its own parent embedding among the top k parents."""
    if len(candidate) == 0:
        return 1.0
    sims = _unit(candidate) @ _unit(parent).T
    own = np.diag(sims)
    rank = (sims > own[:, None]).sum(axis=1)  # ties count in the item's favour
    return float(np.mean(rank < k))


def measure_fidelity(
    candidate: dict[str, np.ndarray], parent: dict[str, np.ndarray], thresholds: GateThresholds | None = None
) -> FidelityReport:
    """Cosines per item, and self-retrieval within each kind's own gallery (images among images, texts among
    texts, composed among composed): a composed query and the image it was built from can be nearly identical
    in a random model (cosine 0.99999), closer than quantization noise, and would make top-1 meaningless."""
    report = FidelityReport(thresholds or GateThresholds())
    hits1 = hits5 = 0
    for kind in parent:
        cos = np.sum(_unit(candidate[kind]) * _unit(parent[kind]), axis=1)
        top1 = retrieval_agreement(candidate[kind], parent[kind], 1)
        top5 = retrieval_agreement(candidate[kind], parent[kind], 5)
        hits1 += top1 * len(cos)
        hits5 += top5 * len(cos)
        report.per_kind[kind] = {
            "count": int(len(cos)),
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "top1": top1,
            "top5": top5,
            "parent_mean_pairwise_cosine": float(_mean_pairwise(parent[kind])),
        }
    all_candidate = np.concatenate([candidate[k] for k in parent])
    all_parent = np.concatenate([parent[k] for k in parent])
    cos = np.sum(_unit(all_candidate) * _unit(all_parent), axis=1)
    mean = all_parent.astype(np.float64).mean(axis=0, keepdims=True)
    centered = np.sum(_unit(all_candidate - mean) * _unit(all_parent - mean), axis=1)
    report.overall = {
        "count": int(len(cos)),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top1": float(hits1 / len(cos)),
        "top5": float(hits5 / len(cos)),
        "centered_mean_cosine": float(centered.mean()),
        "parent_mean_pairwise_cosine": float(_mean_pairwise(all_parent)),
    }
    report.cosines = [float(c) for c in cos]
    return report


def _mean_pairwise(x: np.ndarray) -> float:
    unit = _unit(x)
    sims = unit @ unit.T
    n = len(x)
    return float((sims.sum() - np.trace(sims)) / max(n * (n - 1), 1))
