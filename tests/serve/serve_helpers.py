"""Helpers of the server tests: a real server on 127.0.0.1 (uvicorn in a thread of the test process), data URLs."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from PIL import Image

from pue.runtime import Embedder
from pue.serve import Limits, ServeSettings, create_app

API_KEY = "test-key-0123456789"
MODEL = "ci-fp32"
# Small limits so that every limit can be crossed cheaply.
TEST_LIMITS = Limits(max_body_bytes=2_000_000, max_inputs=16, max_text_chars=2_000, max_image_pixels=1_000_000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    app: Any
    server: Any
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(embedder: Embedder, settings: ServeSettings) -> RunningServer:
    import uvicorn

    port = free_port()
    app = create_app(embedder, settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    running = RunningServer(f"http://127.0.0.1:{port}", app, server, thread)
    wait_ready(running.url)
    return running


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become ready in {timeout} s")


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff", "WEBP": "webp"}.get(fmt, fmt.lower())
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def decode_url(url: str) -> Image.Image:
    """The RGB image Pillow decodes from a data URL (what the server embeds)."""
    payload = url.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")


def alone(offline: Embedder, queries: list) -> Any:
    """Each query embedded alone (batch of one), stacked."""
    import numpy as np

    return np.stack([offline.embed([query])[0] for query in queries])


def concurrent_embeddings(running: RunningServer, model: str, items: list[object]) -> np.ndarray:
    """One client thread per item, all at once (the official `openai` client, float encoding); the vectors in the
    items' order. An item is a text, or `{"image": data_url}` sent as an Infinity-style image input."""
    import openai

    results: dict[int, np.ndarray] = {}
    lock = threading.Lock()

    def client(index: int) -> None:
        api = openai.OpenAI(base_url=running.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        item = items[index]
        if isinstance(item, dict):
            response = api.embeddings.create(
                model=model, input=[item["image"]], encoding_format="float", extra_body={"modality": "image"}
            )
        else:
            response = api.embeddings.create(model=model, input=item, encoding_format="float")
        with lock:
            results[index] = np.asarray(response.data[0].embedding, dtype=np.float32)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == list(range(len(items))), "a request got no answer"
    return np.stack([results[i] for i in range(len(items))])
