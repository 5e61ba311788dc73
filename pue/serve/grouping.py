"""Rows of different clients share a runtime batch only with rows of the same prompt length.

A batch pads every row to its longest one, and onnxruntime's kernels pick their blocking by shape: a text row
padded among longer ones comes out a few 1e-8 away from the same row run alone (measured on the `ci` preset:
2.2e-8), while rows of equal length batched together give exactly what each gives alone (measured: images in a
batch of 8, bitwise). Grouping by length before the runtime keeps a row's vector what `Embedder.embed([row])`
gives on such CPUs, at the price of smaller batches for texts of mixed lengths (images all have one length).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pue.runtime import Query
from pue.runtime.prompts import PromptTokenizer


def kind_of(query: Query) -> str:
    if query.image is None:
        return "text"
    return "image" if query.text is None else "composed"


def embed_grouped_by_length(
    embed: Callable[[list[Query]], np.ndarray], prompts: PromptTokenizer
) -> Callable[[list[Query]], np.ndarray]:
    """`embed`, run once per group of rows with the same prompt length; vectors come back in the rows' order."""

    def run(queries: list[Query]) -> np.ndarray:
        lengths = [len(prompts.encode(kind_of(q), q.text)[0]) for q in queries]
        groups: dict[int, list[int]] = {}
        for index, length in enumerate(lengths):
            groups.setdefault(length, []).append(index)
        if len(groups) == 1:
            return embed(queries)
        out: np.ndarray | None = None
        for indices in groups.values():
            vectors = embed([queries[i] for i in indices])
            if out is None:
                out = np.empty((len(queries), vectors.shape[1]), dtype=vectors.dtype)
            out[indices] = vectors
        assert out is not None
        return out

    return run
