"""`--allow-remote-images` on: an http image is fetched once and embeds like the same image sent inline; a redirect
to another scheme, an unreachable host and an oversized body are 400/413; a prompt past max_seq_len is a 400."""

from __future__ import annotations

import dataclasses
import http.server
import io
import threading

import numpy as np
import pytest
from serve_helpers import API_KEY, MODEL, TEST_LIMITS, data_url, start_server

from pue.runtime import Query
from pue.serve import ServeSettings


@pytest.fixture(scope="module")
def remote_server(embedder):
    # texts may be long here, so that one can pass the length limit and still exceed the bundle's max_seq_len
    limits = dataclasses.replace(TEST_LIMITS, allow_remote_images=True, remote_timeout_s=5.0, max_text_chars=200_000)
    settings = ServeSettings(model_name=MODEL, api_key=API_KEY, max_batch=8, max_wait_ms=5, limits=limits)
    running = start_server(embedder, settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def image_host(patches):
    hits: list[str] = []
    buffer = io.BytesIO()
    patches[0].save(buffer, format="PNG")
    png = buffer.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
                return
            body = png if self.path == "/patch.png" else b"\0" * (TEST_LIMITS.max_body_bytes + 10)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()


def embeddings(running, items: list[object]) -> tuple[int, dict]:
    with running.client() as client:
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": items, "modality": "image"})
    return response.status_code, response.json()


def test_an_allowed_remote_image_embeds_like_the_same_image_inline(remote_server, image_host, offline, patches):
    host, hits = image_host
    status, body = embeddings(remote_server, [f"{host}/patch.png", data_url(patches[0])])
    assert status == 200, body
    remote, inline = (np.asarray(row["embedding"], dtype=np.float32) for row in body["data"])
    assert hits.count("/patch.png") == 1
    assert np.abs(remote - inline).max() <= 1e-6
    assert np.abs(remote - offline.embed([Query(image=patches[0])])[0]).max() <= 1e-6


@pytest.mark.parametrize(
    ("path", "status", "code"), [("/redirect", 400, "image_fetch_failed"), ("/huge.png", 413, None)]
)
def test_remote_refusals(remote_server, image_host, path, status, code):
    host, _ = image_host
    got, body = embeddings(remote_server, [f"{host}{path}"])
    assert got == status, body
    assert "error" in body and (code is None or body["error"]["code"] == code)
    assert "/etc/passwd" not in str(body)


def test_an_unreachable_host_is_a_400(remote_server):
    got, body = embeddings(remote_server, ["http://127.0.0.1:9/none.png"])
    assert got == 400 and body["error"]["code"] == "image_fetch_failed"


def test_a_prompt_past_max_seq_len_is_a_400_naming_the_row(remote_server, embedder):
    words = embedder.manifest.max_seq_len  # at least one token per word: longer than the bundle accepts
    text = " ".join(["glandular"] * words)
    with remote_server.client() as client:
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": ["short", text]})
    assert response.status_code == 400, response.text
    assert "max_seq_len" in response.json()["error"]["message"] and "1" in str(response.json()["error"]["param"])
