"""Calibration data readers that feed each graph its true inputs, streaming (one sample at a time).

The vision graph gets preprocessed patches. The decoder gets what it sees in service: image prompts with the
image features the FP32 vision graph produces for those patches, text prompts (captions), composed
prompts (patch + modifier), and rows of several patches (2 or 4, where the bundle takes them). Nothing is held
beyond the current sample, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pue.calibration.sources import Patch
from pue.runtime.backends.base import decoder_feed

DEFAULT_MODIFIERS = [
    "with more lymphocytes",
    "as an immunohistochemistry stain",
    "at higher magnification",
    "with less stroma",
    "stained with hematoxylin and eosin",
    "showing necrosis",
]


@dataclass
class CalibrationPlan:
    """What to feed: patches for images, captions for texts, (patch, modifier) pairs for composed prompts, and sets
    of patches embedded as one row each."""

    patches: list[Patch]
    captions: list[str]
    composed: list[tuple[Patch, str]]
    image_sets: list[list[Patch]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "patches": len(self.patches),
            "captions": len(self.captions),
            "composed": len(self.composed),
            "image_sets": len(self.image_sets),
        }


def default_captions(limit: int, seed: int = 0) -> list[str]:
    """Captions from the built-in pathology corpus (never the gate's texts)."""
    from pue.data import data_dir

    lines = [line.strip() for line in (data_dir() / "corpus.txt").read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lines))[:limit]
    return [lines[i] for i in sorted(order)]


def make_plan(
    patches: list[Patch],
    captions: list[str],
    composed_share: float = 0.25,
    seed: int = 0,
    image_set_share: float = 0.125,
    image_set_sizes: tuple[int, ...] = (2, 4),
) -> CalibrationPlan:
    """Every patch as an image row, a share of them again with a modifier, and a share as sets of consecutive
    patches (sizes cycling through `image_set_sizes`)."""
    count = max(1, int(len(patches) * composed_share)) if patches else 0
    rng = np.random.default_rng(seed + 1)
    chosen = rng.choice(len(patches), size=count, replace=False) if count else []
    composed = [(patches[int(i)], DEFAULT_MODIFIERS[k % len(DEFAULT_MODIFIERS)]) for k, i in enumerate(chosen)]
    image_sets = []
    wanted = max(1, int(len(patches) * image_set_share)) if image_set_share > 0 else 0
    for k in range(wanted):
        size = image_set_sizes[k % len(image_set_sizes)]
        if size > len(patches):
            break
        start = int(rng.integers(0, len(patches) - size + 1))
        image_sets.append(patches[start : start + size])
    return CalibrationPlan(patches, captions, composed, image_sets)


class VisionFeeds:
    """{"pixel_values": [1, crops, 3, H, W]} per patch."""

    def __init__(self, embedder: Any, patches: list[Patch], limit: int | None = None) -> None:
        self.embedder = embedder
        self.patches = patches[:limit] if limit else patches

    def __len__(self) -> int:
        return len(self.patches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index, patch in enumerate(self.patches):
            yield {"pixel_values": self.embedder.pixel_values([patch.load()], first_index=index)}


class DecoderFeeds:
    """The decoder's feed per prompt (input_ids, attention_mask, image_features and any other per-image input, as
    the runtime builds it: `decoder_feed`): image, text, composed and (where the bundle takes them) several-image
    rows, interleaved."""

    def __init__(self, embedder: Any, plan: CalibrationPlan, limit: int | None = None) -> None:
        self.embedder = embedder
        rows: list[tuple[str, list[Patch], str | None]] = [("image", [p], None) for p in plan.patches]
        rows += [("text", [], c) for c in plan.captions]
        rows += [("composed", [p], m) for p, m in plan.composed]
        if getattr(embedder, "takes_image_sets", False):
            most = embedder.max_images_per_row  # sets that fit the bundle's max_seq_len
            rows += [("image", list(patches), None) for patches in plan.image_sets if len(patches) <= most]
        order = np.random.default_rng(0).permutation(len(rows))  # mix kinds so any prefix is representative
        self.rows = [rows[i] for i in order][:limit] if limit else [rows[i] for i in order]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        prompts = self.embedder.prompts
        manifest = self.embedder.manifest
        backend = self.embedder.backend
        decoder_inputs = backend.decoder.input_metadata()
        for index, (kind, patches, text) in enumerate(self.rows):
            ids, _ = prompts.encode(kind, text, index=index, truncate=True, images=max(1, len(patches)))
            input_ids, attention_mask = prompts.pad([ids])
            outputs = None
            if patches:
                pixels = self.embedder.pixel_values([patch.load() for patch in patches], first_index=index)
                outputs = backend.vision.infer({"pixel_values": pixels})
            image_rows = np.zeros(len(patches), np.int64)  # the row's images one after another
            yield decoder_feed(decoder_inputs, input_ids, attention_mask, outputs, image_rows, manifest.hidden_size)


class OrtReader:
    """Adapts a feed iterable to onnxruntime.quantization's CalibrationDataReader protocol (get_next/rewind)."""

    def __init__(self, feeds: Any) -> None:
        self.feeds = feeds
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iterator is None:
            self._iterator = iter(self.feeds)
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = None

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)
