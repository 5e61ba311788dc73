"""The FP32 parent's rows of the calibration check items (every INT8 search decision compares with them), taken from
the statistics pass where it embeds the same rows.

The statistics pass runs the float decoder on every calibration row, and each run ends in the row's embedding: the
check's items are calibration rows (`check_items.check_gate_set`), so their parent rows come from there rather than
from embedding them again (on the `bench` preset that second embedding was about a tenth of a static INT8 run:
BENCHMARKS, session 27). The rows taken are checked against the parent's own on the first `REFERENCE_ITEMS`
patches and texts among them; where they do not agree to `REFERENCE_MIN_COSINE` (a graph the statistics pass reads
that no longer computes the parent's function), none is taken and the reference embeds them all. Items the pass did
not embed are embedded by the reference. `record` says which, for `fidelity.json["reference"]["check_rows"]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pue.calibration.reference import REFERENCE_ITEMS, REFERENCE_MIN_COSINE
from pue.gate_set import GateSet
from pue.runtime.backends.base import SENTENCE_EMBEDDING
from pue.runtime.embedder import matryoshka_cut

__all__ = ["CheckRows"]


class CheckRows:
    """The parent's rows of `items` (the check set), whose calibration rows `keys` names per kind
    (`check_items.check_row_keys`): `observe` is shown the statistics pass's decoder outputs, `rows()` returns them
    completed as `GateSet.embed` would (the reference, `embed`, embeds what the pass did not; `parent`, the parent's
    embedder, decides which kinds there are and checks the rows taken)."""

    def __init__(
        self,
        items: GateSet,
        keys: dict[str, list[tuple[Any, ...]]],
        embed: Callable[[GateSet], dict[str, np.ndarray]],
        parent: Any,
    ) -> None:
        self.items = items
        self.embed = embed
        self.parent = parent
        self.lists, kept = _measured(items, parent)
        self.wanted = {
            keys[kind][index]: (kind, position)
            for kind, indices in kept.items()
            for position, index in enumerate(indices)
            if index < len(keys.get(kind, []))
        }
        self.taken: dict[tuple[str, int], np.ndarray] = {}
        self.record: dict[str, Any] = {}
        self._rows: dict[str, np.ndarray] | None = None

    def observe(self, feeds: Any, index: int, outputs: dict[str, np.ndarray]) -> None:
        """One statistics-pass row: kept where it is a check item's (`feeds.row_key(index)`)."""
        where = self.wanted.get(feeds.row_key(index)) if self._rows is None else None
        if where is not None and SENTENCE_EMBEDDING in outputs:
            row = np.asarray(outputs[SENTENCE_EMBEDDING], np.float32).reshape(1, -1)
            self.taken[where] = matryoshka_cut(row, self.parent.dimension)[0]

    def rows(self) -> dict[str, np.ndarray]:
        """Every kind's parent rows, in `GateSet.embed`'s order (completed on the first call)."""
        if self._rows is None:
            self._rows = self._complete()
        return self._rows

    def _complete(self) -> dict[str, np.ndarray]:
        agreement = self._agreement()
        if agreement is not None and agreement["min_cosine"] < REFERENCE_MIN_COSINE:
            self.taken.clear()  # not the parent's function: the reference embeds every item
        lists = self.lists
        missing = {kind: [i for i in range(len(items)) if (kind, i) not in self.taken] for kind, items in lists.items()}
        embedded: dict[str, np.ndarray] = {}
        if any(missing.values()):
            embedded = self.embed(
                GateSet(
                    images=[lists["images"][i] for i in missing["images"]],
                    texts=[lists["texts"][i] for i in missing["texts"]],
                    composed_images=[lists["composed"][i][0] for i in missing["composed"]],
                    composed_texts=[lists["composed"][i][1] for i in missing["composed"]],
                    image_sets=[lists["image_sets"][i] for i in missing["image_sets"]],
                )
            )
        rows: dict[str, np.ndarray] = {}
        for kind, items in lists.items():
            if kind == "image_sets" and not items:
                continue  # `GateSet.embed` measures no image sets here
            out = np.zeros((len(items), self.parent.dimension), np.float32)
            for (taken_kind, i), row in self.taken.items():
                if taken_kind == kind:
                    out[i] = row
            if missing[kind]:
                out[missing[kind]] = embedded[kind]
            rows[kind] = out
        self.record = {
            "from_statistics_pass": len(self.taken),
            "embedded": sum(len(v) for v in missing.values()),
            "agreement": agreement,
        }
        self.taken.clear()
        return rows

    def _agreement(self) -> dict[str, float | int] | None:
        """The first `REFERENCE_ITEMS` patches and texts among the rows taken against the parent's own rows (None
        where none was taken)."""
        images = [i for i in range(len(self.lists["images"])) if ("images", i) in self.taken][:REFERENCE_ITEMS]
        texts = [i for i in range(len(self.lists["texts"])) if ("texts", i) in self.taken][:REFERENCE_ITEMS]
        if not images and not texts:
            return None
        own = [self.parent.embed_images([self.lists["images"][i] for i in images])] if images else []
        own += [self.parent.embed_texts([self.lists["texts"][i] for i in texts])] if texts else []
        ours = np.stack([self.taken[("images", i)] for i in images] + [self.taken[("texts", i)] for i in texts])
        cosines = np.sum(np.concatenate(own) * ours, axis=1)
        return {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()), "count": len(cosines)}


def _measured(items: GateSet, parent: Any) -> tuple[dict[str, list[Any]], dict[str, list[int]]]:
    """Each kind's items as `GateSet.embed` measures them with `parent` (image sets: only those it takes in one row,
    none where it takes one image per row), and their indices in `items`."""
    sets = items.measured_sets(parent)
    lists: dict[str, list[Any]] = {
        "images": list(items.images),
        "texts": list(items.texts),
        "composed": list(zip(items.composed_images, items.composed_texts, strict=True)),
        "image_sets": [items.image_sets[i] for i in sets],
    }
    indices = {kind: list(range(len(lists[kind]))) for kind in ("images", "texts", "composed")}
    return lists, {**indices, "image_sets": sets}
