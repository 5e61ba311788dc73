"""Rows of concurrent clients share batches only with rows of their own prompt length, so an fp32 row's vector is
bitwise the one `Embedder.embed([row])` gives, wherever the runtime's kernels do not depend on the batch size."""

from __future__ import annotations

import numpy as np
from serve_helpers import API_KEY, MODEL, concurrent_embeddings, data_url, start_server

from pue.runtime import Query
from pue.serve import ServeSettings
from pue.serve.grouping import embed_grouped_by_length, kind_of

TEXTS = [f"sample {i}: {'glandular ' * (i % 6)}epithelium" for i in range(12)]


def test_grouping_returns_rows_in_order_and_runs_one_batch_per_length(embedder):
    seen: list[list[str | None]] = []

    def fake(queries):
        seen.append([q.text for q in queries])
        return np.array([[float(len(q.text or ""))] for q in queries], dtype=np.float32)

    queries = [Query(text=t) for t in ["a", "glandular epithelium", "b", "glandular epithelium!", "c"]]
    out = embed_grouped_by_length(fake, embedder.prompts)(queries)
    assert out[:, 0].tolist() == [len(q.text) for q in queries]
    lengths = {len(embedder.prompts.encode(kind_of(q), q.text)[0]) for q in queries}
    assert len(seen) == len(lengths) and sorted(sum(seen, [])) == sorted(q.text for q in queries)


def test_fp32_rows_are_bitwise_what_they_are_alone(embedder, offline, patches):
    rows = [Query(text=t) for t in TEXTS] + [Query(image=p) for p in patches]
    alone = np.stack([offline.embed([row])[0] for row in rows])
    padded = offline.embed([Query(text=t) for t in TEXTS], batch_size=len(TEXTS))
    same_length = offline.embed([Query(image=p) for p in patches], batch_size=len(patches))
    assert not np.array_equal(padded, alone[: len(TEXTS)])  # padding alone moves rows: the grouping is needed
    kernels_batch_invariant = np.array_equal(same_length, alone[len(TEXTS) :])

    settings = ServeSettings(model_name=MODEL, api_key=API_KEY, max_batch=8, max_wait_ms=50)
    running = start_server(embedder, settings)
    wire = list(TEXTS) + [{"image": data_url(p)} for p in patches]
    try:
        got = concurrent_embeddings(running, MODEL, wire)
    finally:
        running.stop()
    if kernels_batch_invariant:
        assert np.array_equal(got, alone), np.abs(got - alone).max()
    else:  # this CPU's kernels change with the batch size itself: float rounding is all that can be promised
        assert np.abs(got - alone).max() <= 1e-6
