"""Session fixtures: tiny checkpoints and their FP32 bundles, built once per test session into tmp dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# A test that asks for one of these builds a tiny checkpoint (torch, transformers) and usually exports it to ONNX
# with its parity gate: seconds each, once per session. Such tests are marked `slow` at collection, so that
# `pytest -m "not slow"` (README: the fast subset) never pays for a model build.
MODEL_FIXTURES = frozenset({"tiny_checkpoint", "fp32_bundle", "reference_embedder"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def gate_subset() -> list[Path]:
    """Held-out patches for the parity gate in tests: both stains, fewer tiles (the CLI gate uses them all)."""
    from pue.data import patch_set

    heldout = patch_set("heldout")
    ihc = [p for p in heldout if p.name.startswith("ihc")]
    return [p for p in heldout if not p.name.startswith("ihc")][:10] + ihc


@pytest.fixture(scope="session")
def gate_images() -> list[Path]:
    return gate_subset()


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory: pytest.TempPathFactory, gate_images: list[Path]) -> Path:
    """The gate subset as a folder, for `--heldout`."""
    import shutil

    folder = tmp_path_factory.mktemp("heldout")
    for path in gate_images:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_checkpoint(arch, preset) → path of a checkpoint built once per session."""
    cache: dict[tuple[str, str], Path] = {}

    def build(arch: str = "llava_next", preset: str = "ci") -> Path:
        key = (arch, preset)
        if key not in cache:
            from pue.export.tiny_models import build_tiny_model

            out = tmp_path_factory.mktemp("checkpoints") / f"{arch}-{preset}"
            cache[key] = build_tiny_model(out, arch=arch, preset=preset, seed=0)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """fp32_bundle(arch, preset, exporter) → path of a gated FP32 bundle built once per session."""
    cache: dict[tuple[str, str, str], Path] = {}

    def build(arch: str = "llava_next", preset: str = "ci", exporter: str = "torchscript") -> Path:
        key = (arch, preset, exporter)
        if key not in cache:
            from pue.export.onnx_bundle import export_onnx_bundle

            out = tmp_path_factory.mktemp("bundles") / f"{arch}-{preset}-{exporter}"
            export_onnx_bundle(tiny_checkpoint(arch, preset), out, exporter=exporter, heldout=gate_subset())
            cache[key] = out
        return cache[key]

    return build


@pytest.fixture(scope="session")
def reference_embedder(tiny_checkpoint: Callable[..., Path]) -> Callable[..., object]:
    cache: dict[tuple[str, str, int], object] = {}

    def load(arch: str = "llava_next", preset: str = "ci", tile_size: int = 224) -> object:
        key = (arch, preset, tile_size)
        if key not in cache:
            from pue.export import ReferenceEmbedder

            cache[key] = ReferenceEmbedder.load(tiny_checkpoint(arch, preset), tile_size=tile_size)
        return cache[key]

    return load
