"""Session fixtures: tiny checkpoints and their FP32 bundles, built once per test session into tmp dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# A test that asks for one of these builds a tiny checkpoint (torch, transformers) and usually exports it to ONNX
# with its parity gate: seconds each, once per session. Such tests are marked `slow` at collection, so that
# `pytest -m "not slow"` (README: the fast subset) never pays for a model build.
MODEL_FIXTURES = frozenset(
    {
        "tiny_checkpoint",
        "fp32_bundle",
        "reference_embedder",
        "quantized_bundle",
        "qwen3_embedding_bundle",
        "outlier_report",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def heldout_tiles(he: int = 10) -> list[Path]:
    """Held-out patches for tests: `he` H&E tiles, then every IHC tile (the CLI gate uses the whole held-out set)."""
    from pue.data import patch_set

    heldout = patch_set("heldout")
    ihc = [p for p in heldout if p.name.startswith("ihc")]
    return [p for p in heldout if not p.name.startswith("ihc")][:he] + ihc


def gate_subset() -> list[Path]:
    """The gate of the `ci` torchscript bundles and of `heldout_dir`: both stains, 6 tiles, so one set of 2 and one
    of 4 images (the gate's time grows with its image rows; every such bundle and every quantization pays it)."""
    return heldout_tiles(he=4)


def small_gate() -> list[Path]:
    """One H&E and one IHC tile, the gate's minimum (so one set of 2 images): the export gate of the session's other
    bundles (the e5v geometry, the dynamo exporter, the outlier presets). It still checks every kind (images, texts,
    composed, a set, vision features) on both stains; the tests of those bundles check them on more tiles where
    that is their subject (test_multi_image_parity.py for dynamo) or read them as quantization parents."""
    return heldout_tiles(he=1)[:1] + heldout_tiles(he=0)[:1]


# The bundles many tests read (and test_onnx_export.py checks the gate of on the gate subset): the two `ci` geometries
# through the default exporter.
FULL_GATE_BUNDLES = frozenset({("llava_next", "ci", "torchscript"), ("llava", "ci", "torchscript")})


@pytest.fixture(scope="session")
def gate_images() -> list[Path]:
    """12 held-out tiles (10 H&E, 2 IHC), for tests that need more tiles than the gate subset has."""
    return heldout_tiles()


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gate subset as a folder, for `--heldout`."""
    import shutil

    folder = tmp_path_factory.mktemp("heldout")
    for path in gate_subset():
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
    """fp32_bundle(arch, preset, exporter) → path of a gated FP32 bundle built once per session (gated on the gate
    subset for FULL_GATE_BUNDLES, on `small_gate()` otherwise)."""
    cache: dict[tuple[str, str, str], Path] = {}

    def build(arch: str = "llava_next", preset: str = "ci", exporter: str = "torchscript") -> Path:
        key = (arch, preset, exporter)
        if key not in cache:
            from pue.export.onnx_bundle import export_onnx_bundle

            out = tmp_path_factory.mktemp("bundles") / f"{arch}-{preset}-{exporter}"
            heldout = gate_subset() if key in FULL_GATE_BUNDLES else small_gate()
            export_onnx_bundle(tiny_checkpoint(arch, preset), out, exporter=exporter, heldout=heldout)
            cache[key] = out
        return cache[key]

    return build


@pytest.fixture(scope="session")
def qwen3_embedding_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[..., Path]) -> Path:
    """The `qwen3_vl/ci` checkpoint exported with the Qwen3-VL-Embedding recipe, cut to `MATRYOSHKA_CUT` (a gated
    FP32 bundle with DeepStack, M-RoPE and a Matryoshka output; its gate on two held-out tiles), once per session."""
    from qwen_helpers import MATRYOSHKA_CUT, embedding_recipe, export_heldout

    from pue.export.onnx_bundle import export_onnx_bundle

    folder = tmp_path_factory.mktemp("qwen3-embedding")
    out = folder / "bundle"
    recipe = embedding_recipe(folder)
    export_onnx_bundle(
        tiny_checkpoint("qwen3_vl", "ci"), out, recipe=recipe, embedding_dim=MATRYOSHKA_CUT, heldout=export_heldout()
    )
    return out


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


# What the session's quantized bundles are calibrated on: 16 patches and 8 captions (the CLI default is 64 and 32).
FAST_CALIBRATION = {"num_patches": 16, "num_captions": 8}


@pytest.fixture(scope="session")
def quantized_bundle(tmp_path_factory: pytest.TempPathFactory, fp32_bundle: Callable[..., Path]) -> Callable[..., Any]:
    """quantized_bundle(precision, target) → (path, QuantizeResult): the `llava_next/ci` bundle quantized once per
    session with FAST_CALIBRATION and the gate subset held out. Tests read these bundles and never change them."""
    cache: dict[tuple[str, str], tuple[Path, Any]] = {}

    def build(precision: str, target: str = "onnxruntime") -> tuple[Path, Any]:
        key = (precision, target)
        if key not in cache:
            from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle

            out = tmp_path_factory.mktemp("quantized") / f"{precision}-{target}"
            options = QuantizeOptions(precision=precision, target=target, heldout=gate_subset(), **FAST_CALIBRATION)
            cache[key] = (out, quantize_bundle(fp32_bundle("llava_next", "ci"), out, options))
        return cache[key]

    return build


@pytest.fixture(scope="session")
def outlier_report(fp32_bundle: Callable[..., Path]) -> Callable[..., Any]:
    """outlier_report(arch, preset, rotate=False) → `bundle_outliers` of that session bundle on 4 patches and 4
    captions, once per session (test_outliers.py and test_rotation.py measure the gains bundles alike); read only."""
    cache: dict[tuple[str, str, bool], Any] = {}

    def measure(arch: str, preset: str, rotate: bool = False) -> Any:
        key = (arch, preset, rotate)
        if key not in cache:
            from pue.calibration.outliers import bundle_outliers

            cache[key] = bundle_outliers(fp32_bundle(arch, preset), num_patches=4, num_captions=4, rotate=rotate)
        return cache[key]

    return measure
