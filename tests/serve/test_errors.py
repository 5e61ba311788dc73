"""Every refusal of items 4-5 of issue 21, over HTTP: status, OpenAI error schema, the row it names, no 500s."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import API_KEY, MODEL, TEST_LIMITS, data_url


def post(client: httpx.Client, body: object, **kwargs: object) -> httpx.Response:
    return client.post("/v1/embeddings", json=body, **kwargs)


def assert_error(response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with server.client() as http_client:
        yield http_client


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


NOISE_PNG = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))


# ------------------------------------------------------------------------------------------------ request shape
@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"model": MODEL, "input": [[1, 2, 3]]}, "input", "send strings"),
        ({"model": MODEL, "input": [1, 2, 3]}, "input", "send strings"),
        ({"model": MODEL, "input": []}, "input", "empty"),
        ({"model": MODEL, "input": 5}, "input", "string or a list"),
        ({"model": MODEL}, "input", "either input or messages"),
        ({"model": MODEL, "input": "x", "messages": []}, "input", "not both"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"model": MODEL, "input": "x", "dimensions": 32}, "dimensions", "supported dimensions: [64]"),
        ({"model": MODEL, "input": "x", "dimensions": "64"}, "dimensions", "positive integer"),
        ({"model": MODEL, "input": "x", "frobnicate": 1}, "frobnicate", "unknown field"),
        ({"model": MODEL, "input": "x", "modality": "audio"}, "modality", "text, image"),
        ({"model": MODEL, "input": ["ok", {"image": "data:,"}], "modality": "image"}, "input[1]", "a data URL string"),
        ({"model": MODEL, "input": ["x", "ok"], "modality": "image"}, "input[0]", "as a data: URL"),
        ({"model": MODEL, "input": ["ok", {"txt": "x"}]}, "input[1]", "unknown key"),
        ({"model": MODEL, "input": ["ok", {}]}, "input[1]", "needs 'image', 'text' or both"),
        ({"model": MODEL, "input": ["ok", "<image> and more"]}, "input[1]", "image placeholder"),
        ({"model": MODEL, "input": ["ok", "x" * 2_001]}, "input[1]", "2001 characters"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client, body, param, needle):
    error = assert_error(post(client, body), 400, param=param)
    assert needle in error["message"]


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "x"}], "exactly one user message"),
        ([{"role": "system", "content": "be nice"}], "role 'system'"),
        ([{"role": "assistant", "content": "x"}], "role 'assistant'"),
        ([{"role": "user", "content": []}], "non-empty list"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "'text'"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "2 texts"),
        ([{"role": "user", "content": "x", "name": "bob"}], "unsupported key"),
    ],
)
def test_messages_the_recipe_cannot_express_are_400(client, messages, needle, patches):
    assert needle in assert_error(post(client, {"model": MODEL, "messages": messages}), 400)["message"]


def test_two_images_in_one_message_are_400(client, patches):
    part = {"type": "image_url", "image_url": {"url": data_url(patches[0])}}
    error = assert_error(post(client, {"messages": [{"role": "user", "content": [part, part]}]}), 400)
    assert "2 images" in error["message"]


def test_chat_template_fields_are_refused_not_ignored(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "chat_template": "{{ messages }}"}
    error = assert_error(post(client, body), 400, param="chat_template", code="unsupported_field")
    assert "recipe" in error["message"]


def test_wrong_model_is_404(client):
    assert_error(post(client, {"model": "text-embedding-3-small", "input": "x"}), 404, code="model_not_found")


def test_malformed_json_and_wrong_content_type(client):
    headers = {"Content-Type": "application/json"}
    assert_error(client.post("/v1/embeddings", content=b'{"input": ["x",', headers=headers), 400, code="invalid_json")
    assert_error(client.post("/v1/embeddings", content=b"\xff\xfe", headers=headers), 400, code="invalid_json")
    text_plain = {"Content-Type": "text/plain"}  # a cross-site form post
    body = json.dumps({"model": MODEL, "input": "x"}).encode()
    assert_error(client.post("/v1/embeddings", content=body, headers=text_plain), 415)
    assert_error(client.post("/v1/embeddings", content=body, headers={"Content-Type": ""}), 415)


def test_unknown_routes_and_methods_use_the_error_schema(client):
    assert_error(client.get("/v1/nothing"), 404, code="not_found")
    assert_error(client.get("/v1/embeddings"), 405)


# ------------------------------------------------------------------------------------------------- sizes, limits
def test_too_many_inputs_is_413(client):
    assert_error(post(client, {"model": MODEL, "input": ["x"] * (TEST_LIMITS.max_inputs + 1)}), 413)


def test_a_body_over_the_limit_is_413_declared_or_streamed(client):
    big = json.dumps({"model": MODEL, "input": "x" * TEST_LIMITS.max_body_bytes}).encode()
    headers = {"Content-Type": "application/json"}
    assert_error(client.post("/v1/embeddings", content=big, headers=headers), 413, code="request_too_large")

    def chunks():  # no Content-Length: the server counts while it reads
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    assert_error(client.post("/v1/embeddings", content=chunks(), headers=headers), 413, code="request_too_large")


def test_a_decompression_bomb_is_refused_before_decoding(client):
    bomb = png_bytes(Image.new("1", (12_000, 12_000)))  # 144 M pixels in a few kB
    assert len(bomb) < 100_000
    error = assert_error(post(client, {"model": MODEL, "input": ["ok", {"image": b64_url(bomb)}]}), 400)
    assert error["param"] == "input[1]" and "too many pixels" in error["message"] and error["code"] == "image_too_large"
    over_limit = png_bytes(Image.new("RGB", (1001, 1000)))
    error = assert_error(post(client, {"model": MODEL, "input": [b64_url(over_limit)], "modality": "image"}), 400)
    assert "1001x1000" in error["message"]


# ----------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    ("url", "code", "needle"),
    [
        ("data:image/png;base64,iVBORw0KGgo%%%", "invalid_base64", "not valid base64"),
        ("data:image/png,rawbytes", "invalid_image", "base64-encoded"),
        ("data:text/plain;base64," + base64.b64encode(b"hello").decode(), "invalid_image", "not an image"),
        (b64_url(b"this is not an image at all"), "invalid_image", "not a PNG, JPEG, TIFF or WebP"),
        (b64_url(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "image/eps"), "invalid_image", "PNG, JPEG"),
        (b64_url(NOISE_PNG[: len(NOISE_PNG) // 2]), "invalid_image", "truncated or corrupt"),
        ("/etc/passwd", "invalid_image_url", "never opened as file paths"),
        ("file:///etc/passwd", "invalid_image_url", "never opened as file paths"),
        ("https://example.org/patch.png", "remote_images_disabled", "--allow-remote-images"),
    ],
)
def test_bad_images_are_400_naming_the_row(client, url, code, needle):
    error = assert_error(post(client, {"model": MODEL, "input": ["ok", {"image": url, "text": "x"}]}), 400, code=code)
    assert error["param"] == "input[1]"
    if needle:
        assert needle in error["message"]


def test_gif_and_bmp_are_outside_the_allow_list(client):
    for fmt in ("GIF", "BMP"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=fmt)
        url = b64_url(buffer.getvalue(), f"image/{fmt.lower()}")
        assert_error(post(client, {"model": MODEL, "input": [url], "modality": "image"}), 400, code="invalid_image")


def test_remote_urls_are_never_fetched_by_default(client, patches):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png_bytes(patches[0]))

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/patch.png"
        body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}]}
        assert_error(post(client, body), 400, code="remote_images_disabled")
        assert hits == []
    finally:
        httpd.shutdown()


def test_server_paths_never_appear_in_responses(client, serve_bundle):
    for url in (str(serve_bundle / "manifest.json"), b64_url(b"junk")):
        text = post(client, {"model": MODEL, "input": [url], "modality": "image"}).text
        assert str(serve_bundle) not in text and "/tmp" not in text


# ---------------------------------------------------------------------------------------------- who may call
def test_api_key_on_every_route_but_health(server):
    with server.client(key=None) as anonymous, server.client(key="wrong-key") as wrong:
        for http_client in (anonymous, wrong):
            assert http_client.get("/health").status_code == 200
            for response in (
                http_client.get("/v1/models"),
                http_client.get("/metrics"),
                post(http_client, {"model": MODEL, "input": "x"}),
            ):
                assert_error(response, 401, code="invalid_api_key")
                assert response.headers["WWW-Authenticate"] == "Bearer"
    with server.client() as good:
        assert good.get("/metrics").status_code == 200


def test_host_header_is_checked_against_the_bound_names(client):
    evil = {"Host": "attacker.example:8000"}
    assert_error(client.get("/health", headers=evil), 400, code="invalid_host")
    assert_error(post(client, {"model": MODEL, "input": "x"}, headers=evil), 400, code="invalid_host")
    assert client.get("/health", headers={"Host": "localhost:1234"}).status_code == 200


def test_no_bad_input_gets_a_500(client):
    bodies = [
        None, [], "x", 3, {"input": None}, {"input": [None]}, {"input": [True]}, {"input": {"a": 1}},
        {"messages": "x"}, {"messages": [None]}, {"messages": [{"role": "user", "content": [None]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": None}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"input": [{"image": 5}]}, {"input": "x", "model": 5},
        {"input": "x", "dimensions": True},
        {"input": ["data:image/png;base64,"], "modality": "image"}, {"input": [""], "modality": "image"},
    ]  # fmt: skip
    raw = [b'{"model": "ci-fp32", "input": ["\\ud800"]}', b'{"input": NaN}', b"[" * 100_000]
    for body in bodies + raw:
        if isinstance(body, bytes):
            response = client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
        else:
            response = post(client, body)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert "error" in response.json()
    assert API_KEY not in response.text
