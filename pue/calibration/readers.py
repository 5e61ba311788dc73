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


class VisionOutputs:
    """The FP32 vision graph's outputs per calibration patch, kept (up to `limit_bytes` in all) as the vision
    statistics pass computes them (`observe`) or a decoder feed does, so the decoder's feeds of one-patch rows
    (image and composed rows) do not run the vision graph again for a patch (on the `bench` preset the statistics
    pass and the first attempt took 29 s less with it: BENCHMARKS, session 27). Rows of several patches run their
    own batch, as before."""

    def __init__(self, limit_bytes: int = 256 << 20) -> None:
        self.limit_bytes = limit_bytes
        self.outputs: dict[Patch, dict[str, np.ndarray]] = {}
        self.bytes = 0
        self.hits = 0

    def observe(self, feeds: Any, index: int, outputs: dict[str, np.ndarray]) -> None:
        """The vision statistics pass's outputs for its `index`-th feed (`feeds.patches[index]`)."""
        self.keep(feeds.patches[index], outputs)

    def keep(self, patch: Patch, outputs: dict[str, np.ndarray]) -> None:
        """`patch`'s vision outputs, kept (a copy) where they fit the limit."""
        size = sum(value.nbytes for value in outputs.values())
        if patch not in self.outputs and self.bytes + size <= self.limit_bytes:
            self.outputs[patch] = {name: np.array(value, copy=True) for name, value in outputs.items()}
            self.bytes += size

    def get(self, patch: Patch) -> dict[str, np.ndarray] | None:
        """`patch`'s kept outputs (None where none are kept)."""
        found = self.outputs.get(patch)
        self.hits += found is not None
        return found


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


def row_key(kind: str, patches: list[Patch] | tuple[Patch, ...], text: str | None) -> tuple[Any, ...]:
    """What names a calibration row: its kind, patches and text (the same row, the same key)."""
    return (kind, tuple(patches), text)


class DecoderFeeds:
    """The decoder's feed per prompt (input_ids, attention_mask, image_features and any other per-image input, as
    the runtime builds it: `decoder_feed`): image, text, composed and (where the bundle takes them) several-image
    rows, interleaved; `row_key(index)` names the row a feed came from."""

    def __init__(
        self, embedder: Any, plan: CalibrationPlan, limit: int | None = None, vision: VisionOutputs | None = None
    ) -> None:
        self.embedder = embedder
        self.vision = vision  # one patch's vision outputs, where they were kept
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

    def row_key(self, index: int) -> tuple[Any, ...]:
        """The key (`row_key`) of the row the `index`-th feed came from."""
        kind, patches, text = self.rows[index]
        return row_key(kind, patches, text)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        prompts = self.embedder.prompts
        manifest = self.embedder.manifest
        backend = self.embedder.backend
        decoder_inputs = backend.decoder.input_metadata()
        for index, (kind, patches, text) in enumerate(self.rows):
            ids, _ = prompts.encode(kind, text, index=index, truncate=True, images=max(1, len(patches)))
            input_ids, attention_mask = prompts.pad([ids])
            outputs = None
            if len(patches) == 1 and self.vision is not None:
                outputs = self.vision.get(patches[0])
            if patches and outputs is None:
                pixels = self.embedder.pixel_values([patch.load() for patch in patches], first_index=index)
                outputs = backend.vision.infer({"pixel_values": pixels})
                if len(patches) == 1 and self.vision is not None:
                    self.vision.keep(patches[0], outputs)
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
