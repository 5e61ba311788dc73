"""The gates' held-out set: the shipped held-out patches (or a folder of them), the gate texts, composed (image,
modifier) pairs and multi-image rows, embedded by any embedder (`GateSet.embed`) for `pue.fidelity` to measure.

Never used for calibration: calibration patches are `pue.data`'s calibration split, captions come from
pue/data/corpus.txt. numpy and the standard library only: every package may import this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pue.errors import PueError

# Held-out texts of both gates.
# Lengths from empty to several hundred tokens, punctuation, non-ASCII and control characters.
GATE_TEXTS = [
    "",
    "tumor",
    "benign",
    "H&E stained section of colonic mucosa",
    "Lymph node with metastatic carcinoma in the subcapsular sinus.",
    "Well-differentiated adenocarcinoma forming back-to-back glands with cribriform areas.",
    "Normal colonic mucosa: straight crypts, abundant goblet cells, no dysplasia.",
    "Strong membranous HER2 staining in more than ten percent of invasive tumour cells (score 3+).",
    "Fatty tissue with thin fibrous septa and a few small vessels; no atypia identified.",
    "Necrotic debris surrounded by a rim of viable pleomorphic tumour cells with frequent mitoses.",
    "Ki-67 labelling index of roughly forty percent in the hot spot.",
    "Immunohistochemistry for a nuclear marker: brown DAB staining in most epithelial nuclei, blue hematoxylin "
    "counterstain elsewhere.",
    "Invasive ductal carcinoma, grade 2 — nests and cords of atypical cells infiltrating a desmoplastic stroma; "
    "mitoses are present (2 per 10 HPF).",
    "Chronic inflammation with lymphoid aggregates at the base of the mucosa " * 6,
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
# Modifiers of the composed (image + text) queries, one per held-out image from the first.
GATE_MODIFIERS = [
    "make it an IHC stain",
    "as an immunohistochemistry stain",
    "show more stroma",
    "with more inflammatory cells",
    "increase the magnification",
    "at lower magnification",
    "add lymphocytes",
    "without the background glass",
    "with denser stroma",
    "as H&E",
]
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class GateSet:
    """Held-out items of a gate: images, texts, composed (image, modifier) pairs, and sets of several images
    embedded as one row each (`image_sets`; left out for a bundle that takes one image per row)."""

    images: list[Any]
    texts: list[str]
    composed_images: list[Any]
    composed_texts: list[str]
    image_sets: list[list[Any]] = field(default_factory=list)

    @classmethod
    def default(cls, heldout: str | Path | Sequence[Any] | None = None, minimum: int = 4) -> GateSet:
        """The shipped held-out patches (or a folder / list of images), every gate text, one modifier per image,
        and sets of 2 and 4 consecutive held-out images (`image_sets_of`)."""
        if heldout is None:
            from pue.data import patch_set

            images: list[Any] = list(patch_set("heldout"))
        elif isinstance(heldout, (str, os.PathLike)):
            folder = Path(heldout)
            if not folder.is_dir():
                raise PueError(f"held-out folder '{folder}' does not exist or is not a folder")
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        else:
            images = list(heldout)
        if len(images) < minimum:
            raise PueError(
                f"the gate needs at least {minimum} held-out images, found {len(images)}",
                "pass a held-out folder with more patches",
            )
        composed = images[: len(GATE_MODIFIERS)]
        return cls(images, list(GATE_TEXTS), composed, list(GATE_MODIFIERS[: len(composed)]), image_sets_of(images))

    def embed(self, embedder: Any) -> dict[str, np.ndarray]:
        """Every kind's embeddings; `image_sets` only where the embedder takes several images per row, and only the
        sets that fit its sequence limit (`max_images_per_row`)."""
        out = {
            "images": embedder.embed_images(self.images),
            "texts": embedder.embed_texts(self.texts),
            "composed": embedder.embed_composed(self.composed_images, self.composed_texts),
        }
        fitting = [self.image_sets[i] for i in self.measured_sets(embedder)]
        if fitting:
            out["image_sets"] = embedder.embed_image_sets(fitting)
        return out

    def measured_sets(self, embedder: Any) -> list[int]:
        """The indices of the image sets `embed` measures with `embedder`: those that fit its sequence limit, none
        where it takes one image per row."""
        if not self.image_sets or not getattr(embedder, "takes_image_sets", False):
            return []
        most = embedder.max_images_per_row
        return [i for i, images in enumerate(self.image_sets) if len(images) <= most]

    def up_to_images(self, most: int) -> GateSet:
        """The same set without image sets of more than `most` images (what a TensorRT profile takes)."""
        kept = [images for images in self.image_sets if len(images) <= most]
        return replace(self, image_sets=kept)

    def select(self, rows: dict[str, np.ndarray], indices: Sequence[int]) -> tuple[GateSet, dict[str, np.ndarray]]:
        """The items at `indices` of the measured order (`rows`: this set's embeddings as `embed` returns them, kinds
        in order, the order of a report's `cosines`), as a smaller set and its rows."""
        wanted = set(indices)
        kept: dict[str, list[int]] = {}
        start = 0
        for kind, embedded in rows.items():
            kept[kind] = [i - start for i in range(start, start + len(embedded)) if i in wanted]
            start += len(embedded)
        if wanted - set(range(start)):
            raise PueError(f"items {sorted(wanted - set(range(start)))} are not among the {start} measured ones")
        composed = kept.get("composed", [])
        sets = self.image_sets
        if "image_sets" in rows and len(rows["image_sets"]) != len(sets):  # `embed` measured those that fit a row
            sizes = sorted({len(s) for s in sets})
            most = next(n for n in sizes if len(self.up_to_images(n).image_sets) == len(rows["image_sets"]))
            sets = self.up_to_images(most).image_sets
        subset = GateSet(
            images=[self.images[i] for i in kept.get("images", [])],
            texts=[self.texts[i] for i in kept.get("texts", [])],
            composed_images=[self.composed_images[i] for i in composed],
            composed_texts=[self.composed_texts[i] for i in composed],
            image_sets=[sets[i] for i in kept.get("image_sets", [])],
        )
        return subset, {kind: rows[kind][kept[kind]] for kind in rows if kept[kind]}

    def counts(self) -> str:
        sizes = "/".join(str(len(s)) for s in self.image_sets)
        sets = f", {len(self.image_sets)} image sets ({sizes} images)" if self.image_sets else ""
        return f"{len(self.images)} patches, {len(self.texts)} texts, {len(self.composed_texts)} composed{sets}"

    def item_count(self) -> int:
        return len(self.images) + len(self.texts) + len(self.composed_texts) + len(self.image_sets)


def image_sets_of(images: Sequence[Any], sizes: Sequence[int] = (2, 4), most: int = 4) -> list[list[Any]]:
    """Up to `most` sets of consecutive images, their sizes cycling through `sizes`, none overlapping."""
    sets: list[list[Any]] = []
    start = 0
    while len(sets) < most:
        size = sizes[len(sets) % len(sizes)]
        if start + size > len(images):
            break
        sets.append(list(images[start : start + size]))
        start += size
    return sets
