"""48 concurrent clients, 240 requests, a small queue: every request gets its own vectors or a 503, none lost."""

from __future__ import annotations

import random
import threading

import numpy as np
import openai
import pytest
from serve_helpers import API_KEY, MODEL, alone, data_url, start_server

from pue.runtime import Query
from pue.serve import ServeSettings

CLIENTS = 48
REQUESTS_PER_CLIENT = 5
TOLERANCE = 1e-6  # shared batches agree with the row alone to float rounding on this CPU (test_openai_client.py)


@pytest.fixture(scope="module")
def busy_server(embedder):
    settings = ServeSettings(model_name=MODEL, api_key=API_KEY, max_batch=8, max_wait_ms=10, max_queue=24)
    running = start_server(embedder, settings)
    yield running
    running.stop()


def test_concurrent_clients_get_their_own_vectors_or_a_503(busy_server, offline, patches):
    texts = [f"tissue sample {i}: {'glands ' * (i % 5)}stroma" for i in range(16)]
    pool = [Query(text=t) for t in texts] + [Query(image=patches[0]), Query(image=patches[1], text="as IHC")]
    expected = alone(offline, pool)
    items: list[object] = texts + [{"image": data_url(patches[0])}, {"image": data_url(patches[1]), "text": "as IHC"}]
    outcomes: list[tuple[list[int], object]] = []
    lock = threading.Lock()

    def client_thread(seed: int) -> None:
        rng = random.Random(seed)
        client = openai.OpenAI(base_url=busy_server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        for _ in range(REQUESTS_PER_CLIENT):
            # mostly texts (cheap on the ci model), now and then an image or composed row
            picks = [
                rng.randrange(16) if rng.random() < 0.9 else rng.randrange(len(pool)) for _ in range(rng.randint(1, 3))
            ]
            try:
                response = client.embeddings.create(model=MODEL, input=[items[i] for i in picks])  # type: ignore[misc]
                result: object = np.asarray([d.embedding for d in response.data], np.float32)
            except openai.APIStatusError as exc:
                result = exc.status_code
            with lock:
                outcomes.append((picks, result))

    threads = [threading.Thread(target=client_thread, args=(seed,)) for seed in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(outcomes) == CLIENTS * REQUESTS_PER_CLIENT  # none lost
    served = [(picks, result) for picks, result in outcomes if isinstance(result, np.ndarray)]
    refused = [result for _, result in outcomes if not isinstance(result, np.ndarray)]
    assert set(refused) <= {503}, refused
    assert len(served) >= CLIENTS  # the queue bounds, it does not starve
    for picks, vectors in served:  # none mixed up: each row is its own item's vector
        assert vectors.shape == (len(picks), offline.dimension)
        assert np.abs(vectors - expected[picks]).max() <= TOLERANCE
    metrics = busy_server.client().get("/metrics").text
    batches = _sample(metrics, "pue_serve_batch_size_count")
    rows = _sample(metrics, "pue_serve_batch_size_sum")
    assert rows > batches > 0  # requests were coalesced: more than one row per batch on average
    print(f"load: {len(served)} served, {len(refused)} refused (503), {rows / batches:.1f} rows per batch")


def _sample(exposition: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in exposition.splitlines() if line.startswith(name + " "))
