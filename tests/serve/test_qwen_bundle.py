"""`pue-serve` on a Qwen3-VL bundle (DeepStack, M-RoPE, a Matryoshka cut): the OpenAI embeddings API gives what the
Embedder gives alone for texts, images and composed rows, and `dimensions` cuts further down to the recipe's
minimum as the runtime cuts."""

from __future__ import annotations

import numpy as np
import pytest
from qwen_helpers import MATRYOSHKA_CUT
from serve_helpers import API_KEY, alone, data_url, start_server

from pue.runtime import Embedder, Query
from pue.runtime.embedder import matryoshka_cut
from pue.serve import ServeSettings

MODEL = "qwen3-vl-embedding"
TOLERANCE = 1e-6  # a shared batch sums in another order than a row alone (see test_openai_client)


@pytest.fixture(scope="module")
def qwen_server(qwen3_embedding_bundle):
    embedder = Embedder.load(qwen3_embedding_bundle)
    running = start_server(embedder, ServeSettings(model_name=MODEL, api_key=API_KEY, max_batch=8, max_wait_ms=5))
    yield running
    running.stop()
    embedder.close()


def test_texts_images_and_composed_match_the_embedder_alone(qwen_server, qwen3_embedding_bundle, patches):
    url = data_url(patches[0])
    items = ["invasive carcinoma", {"image": url}, {"image": url, "text": "as IHC"}, ""]
    queries = [Query(text="invasive carcinoma"), Query(image=patches[0]), Query(image=patches[0], text="as IHC")]
    queries.append(Query(text=""))
    with Embedder.load(qwen3_embedding_bundle) as offline:
        expected = alone(offline, queries)
    with qwen_server.client() as client:
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": items})
        assert response.status_code == 200, response.text
        got = np.array([row["embedding"] for row in response.json()["data"]], np.float32)
        assert got.shape == (4, MATRYOSHKA_CUT) and np.abs(got - expected).max() <= TOLERANCE

        shorter = client.post("/v1/embeddings", json={"model": MODEL, "input": items, "dimensions": 16})
        assert shorter.status_code == 200, shorter.text
        cut = np.array([row["embedding"] for row in shorter.json()["data"]], np.float32)
        assert np.abs(cut - matryoshka_cut(expected, 16)).max() <= TOLERANCE

        for asked in (8, MATRYOSHKA_CUT + 1):
            refused = client.post("/v1/embeddings", json={"model": MODEL, "input": "x", "dimensions": asked})
            assert refused.status_code == 400 and "supported dimensions: 16 to 32" in refused.text, refused.text
