"""Request parsing, image decoding and the security helpers, without a server or a bundle."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from pue.serve.errors import ApiError
from pue.serve.limits import Limits, decode_image, image_from_string
from pue.serve.schema import parse_request
from pue.serve.security import allowed_hosts, bearer_matches, check_binding, host_allowed, is_loopback, load_api_key

LIMITS = Limits(max_inputs=4, max_text_chars=10, max_image_pixels=100 * 100)


def url_of(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return "data:image/x;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_the_three_request_forms_parse_into_rows():
    openai_form = parse_request({"input": ["a", {"image": "data:1", "text": "b"}, {"image": "data:2"}]}, LIMITS)
    assert [(r.kind, r.param) for r in openai_form.rows] == [
        ("text", "input[0]"),
        ("composed", "input[1]"),
        ("image", "input[2]"),
    ]
    infinity = parse_request({"input": "data:1", "modality": "image", "encoding_format": "base64"}, LIMITS)
    assert [(r.kind, r.image) for r in infinity.rows] == [("image", "data:1")] and infinity.encoding_format == "base64"
    parts = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "data:3"}}]
    vllm = parse_request({"messages": [{"role": "user", "content": parts}], "model": "m"}, LIMITS)
    assert [(r.kind, r.text, r.image) for r in vllm.rows] == [("composed", "x", "data:3")] and vllm.model == "m"


@pytest.mark.parametrize(
    ("body", "status"),
    [({"input": ["a"] * 5}, 413), ({"input": "a" * 11}, 400), ({"input": [[1]]}, 400), ({"input": "a", "x": 1}, 400)],
)
def test_limits_and_refusals(body, status):
    with pytest.raises(ApiError) as error:
        parse_request(body, LIMITS)
    assert error.value.status == status


def test_images_decode_through_the_allow_list_and_the_runtime_rules():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent → white, as pue.runtime.images says
    decoded = image_from_string(url_of(rgba), 0, "input[0]", LIMITS)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)
    for fmt in ("JPEG", "TIFF", "WEBP"):
        assert image_from_string(url_of(Image.new("RGB", (8, 8)), fmt), 0, "p", LIMITS).size == (8, 8)
    with pytest.raises(ApiError, match="too many pixels"):
        decode_image(base64.b64decode(url_of(Image.new("1", (101, 100))).split(",")[1]), 0, "p", LIMITS)


def test_hosts_keys_and_bindings():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")
    loopback = allowed_hosts("127.0.0.1")
    assert host_allowed("127.0.0.1:8000", loopback) and host_allowed("[::1]:8000", loopback)
    assert not host_allowed("evil.example", loopback) and not host_allowed(None, loopback)
    assert allowed_hosts("0.0.0.0") is None and host_allowed("anything", None)
    assert host_allowed("scanner.lab:8000", allowed_hosts("0.0.0.0", ["scanner.lab"]))
    assert bearer_matches("Bearer k1", "k1") and not bearer_matches("Bearer k2", "k1") and not bearer_matches(None, "k")
    assert not bearer_matches("Basic k1", "k1")
    assert load_api_key(None, {"PUE_API_KEY": " k "}) == "k" and load_api_key(None, {}) is None
    check_binding("127.0.0.1", None)
    check_binding("0.0.0.0", "k")
    with pytest.raises(Exception, match="no API key"):
        check_binding("0.0.0.0", None)
