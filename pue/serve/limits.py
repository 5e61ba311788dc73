"""What one request may hold, and images from what clients send (data URLs; http(s) only when allowed).

Image bytes are decoded here, never by a path: a client string is a `data:` URL (or, with
`--allow-remote-images`, an `http(s)` URL fetched with a size cap), anything else is refused, so no client string
is ever opened as a file. Pillow only tries an allow-list of formats (PNG, JPEG, TIFF, WebP: none of them runs an
external program, unlike EPS), and the pixel count is read from the header and checked before anything is decoded
(decompression bombs). The decoded image then goes through the runtime's own conversion rules
(`pue.runtime.images.load_image`: transparency on white, 16-bit scaled, EXIF orientation).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass

from PIL import Image

from pue.errors import InputError
from pue.runtime.images import load_image
from pue.serve.errors import bad_request, too_large

IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP")
_FORMAT_NAMES = "PNG, JPEG, TIFF or WebP"


@dataclass(frozen=True)
class Limits:
    """Per-request limits: body bytes (413), inputs (413), characters per text (400), pixels per image (400)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_inputs: int = 256
    max_text_chars: int = 10_000
    max_image_pixels: int = 4096 * 4096
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_text_chars", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def check_text(text: str, limits: Limits, param: str) -> None:
    if len(text) > limits.max_text_chars:
        raise bad_request(
            f"{param}: the text has {len(text)} characters, more than this server's limit of {limits.max_text_chars}",
            param=param,
            code="text_too_long",
        )


def image_from_string(source: str, index: int, param: str, limits: Limits) -> Image.Image:
    """An RGB image from a `data:` URL (or an allowed http(s) URL); every problem is a 400 naming `param`."""
    return decode_image(image_bytes(source, param, limits), index, param, limits)


def image_bytes(source: str, param: str, limits: Limits) -> bytes:
    if source.startswith("data:"):
        return _data_url_bytes(source, param)
    if source.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise bad_request(
                f"{param}: remote image URLs are not fetched by this server (start it with --allow-remote-images); "
                "send the image as a data: URL (data:image/png;base64,...)",
                param=param,
                code="remote_images_disabled",
            )
        return _fetch(source, param, limits)
    raise bad_request(
        f"{param}: expected an image as a data: URL (data:image/png;base64,...); "
        "strings are never opened as file paths",
        param=param,
        code="invalid_image_url",
    )


def decode_image(data: bytes, index: int, param: str, limits: Limits) -> Image.Image:
    """Decode `data` with the format allow-list, refusing too many pixels before decoding; RGB out."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_many_pixels(param, limits, str(exc)) from exc
        except Exception as exc:  # UnidentifiedImageError and header parse errors: not an allowed image
            raise bad_request(f"{param}: not a {_FORMAT_NAMES} image", param=param, code="invalid_image") from exc
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise _too_many_pixels(param, limits, f"{width}x{height} = {width * height} pixels")
        try:
            image.load()
            return load_image(image, index)
        except InputError as exc:
            raise bad_request(f"{param}: {exc.message}", param=param, code="invalid_image") from exc
        except Exception as exc:  # truncated or corrupt data: a decoder error, the client's to fix
            raise bad_request(
                f"{param}: the image could not be decoded ({type(exc).__name__}); it is truncated or corrupt",
                param=param,
                code="invalid_image",
            ) from exc


def _too_many_pixels(param: str, limits: Limits, found: str) -> Exception:
    return bad_request(
        f"{param}: the image has too many pixels ({found}); this server takes at most {limits.max_image_pixels}",
        param=param,
        code="image_too_large",
    )


def _data_url_bytes(source: str, param: str) -> bytes:
    header, comma, payload = source.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad_request(
            f"{param}: a data: URL must be base64-encoded (data:image/png;base64,...)",
            param=param,
            code="invalid_image",
        )
    media_type = header[len("data:") : -len(";base64")].split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise bad_request(
            f"{param}: the data: URL holds {media_type!r}, not an image", param=param, code="invalid_image"
        )
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{param}: the data: URL is not valid base64", param=param, code="invalid_base64") from exc
    if not data:
        raise bad_request(f"{param}: the data: URL is empty", param=param, code="invalid_image")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if not newurl.startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http(s) URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, param: str, limits: Limits) -> bytes:
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "pue-serve"})
    try:
        with opener.open(request, timeout=limits.remote_timeout_s) as response:
            data = response.read(limits.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise bad_request(
            f"{param}: the image URL could not be fetched ({type(exc).__name__})",
            param=param,
            code="image_fetch_failed",
        ) from exc
    if len(data) > limits.max_body_bytes:
        raise too_large(f"{param}: the remote image is larger than {limits.max_body_bytes} bytes", param=param)
    return data
