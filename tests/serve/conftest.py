"""Fixtures of the server tests: the `ci` FP32 bundle, its Embedders, a server on 127.0.0.1 per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import API_KEY, MODEL, TEST_LIMITS, RunningServer, start_server

from pue.runtime import Embedder
from pue.serve import ServeSettings


@pytest.fixture(scope="session")
def serve_bundle(fp32_bundle) -> Path:
    return fp32_bundle("llava_next", "ci")


@pytest.fixture(scope="session")
def embedder(serve_bundle: Path) -> Embedder:
    return Embedder.load(serve_bundle)


@pytest.fixture(scope="session")
def patches() -> list[Image.Image]:
    from pue.data import patch_set

    return [Image.open(path).convert("RGB") for path in patch_set("heldout")[:3]]


@pytest.fixture(scope="module")
def server(embedder: Embedder) -> Iterator[RunningServer]:
    settings = ServeSettings(model_name=MODEL, api_key=API_KEY, max_batch=8, max_wait_ms=5, limits=TEST_LIMITS)
    running = start_server(embedder, settings)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def offline(serve_bundle: Path) -> Embedder:
    """A second Embedder on the same bundle: what a row gets when embedded alone, offline."""
    return Embedder.load(serve_bundle)
