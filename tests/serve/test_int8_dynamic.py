"""A real int8-dynamic bundle behind the server: its rows depend on their batch companions, so each request is its
own batch and every client gets exactly what `Embedder.embed(its request)` gives, however many clients share it."""

from __future__ import annotations

import numpy as np
import pytest
from serve_helpers import API_KEY, concurrent_embeddings, start_server

from pue.runtime import Embedder, Query
from pue.serve import ServeSettings
from pue.serve.config import batching_policy

MODEL = "ci-int8-dynamic"
TEXTS = [f"tissue sample {i}: {'glands ' * (i % 5)}stroma with {'lymphocytes ' * (i % 3)}" for i in range(12)]


@pytest.fixture(scope="module")
def dynamic_bundle(quantized_bundle):
    return quantized_bundle("int8-dynamic")[0]  # the session's int8-dynamic llava_next/ci bundle (serve_bundle's child)


def test_int8_dynamic_is_batched_per_request_and_matches_the_request_alone(dynamic_bundle):
    embedder = Embedder.load(dynamic_bundle)
    per_request, sentence = batching_policy(embedder.manifest)
    assert per_request and "depends on its batch companions" in sentence
    alone = np.stack([embedder.embed([Query(text=text)])[0] for text in TEXTS])
    together = embedder.embed([Query(text=text) for text in TEXTS], batch_size=len(TEXTS))
    assert np.abs(alone - together).max() > 1e-6  # companions do move int8-dynamic rows: the check below can fail

    settings = ServeSettings(model_name=MODEL, api_key=API_KEY, max_batch=8, max_wait_ms=50, per_request=per_request)
    running = start_server(embedder, settings)
    try:
        got = concurrent_embeddings(running, MODEL, TEXTS)
    finally:
        running.stop()
        embedder.close()
    assert np.abs(got - alone).max() <= 1e-6  # what Embedder.embed(that request) gives, never the batched value
