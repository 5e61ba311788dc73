"""Session fixtures: tiny checkpoints, their FP32 bundles and quantizations, built once per test run into tmp
dirs. Under pytest-xdist (README's test command runs two workers) each item is built once between all workers: the
first worker to ask builds it under a file lock, the others wait for it and read it (`_once`)."""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

# More workers than this only add model builds waiting on each other's locks and a torch import each (about 0.5 GB).
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config: pytest.Config) -> None:
    """Each worker compiles OpenVINO models into its own cache (never the user's ~/.cache; two workers compiling
    one bundle must not write the same cache files), and under pytest-xdist runs on its own share of the cores."""
    if "PUE_OPENVINO_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["PUE_OPENVINO_CACHE_DIR"] = _OWN_CACHE[0] = tempfile.mkdtemp(prefix="pue-test-openvino-")
    _own_cores()


_OWN_CACHE: list[str] = [""]  # the OpenVINO cache this process made (removed when it ends; ~19 MB a worker)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the OpenVINO cache `pytest_configure` made: each test run left one per worker in /tmp before."""
    if _OWN_CACHE[0]:
        shutil.rmtree(_OWN_CACHE[0], ignore_errors=True)
        _OWN_CACHE[0] = ""


def _own_cores() -> None:
    """Worker i of n keeps cores i, i+n, … and as many torch/OpenMP threads (onnxruntime sizes its pool from the
    affinity, pue.runtime.cpu.physical_core_count): n workers each spinning a pool over every core slowed each test
    about 2× on two cores, measured. Runs before any test module imports torch."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    index, workers = int(worker.removeprefix("gw")), int(count)
    if len(cpus) < workers:
        return
    share = cpus[index % workers :: workers]
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))


def _run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder this test run shares between its workers: a worker's basetemp is a child of the run's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


_BUILT: dict[str, Any] = {}  # this worker's values of `_once`, by name


def _once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Any:
    """build(folder) once per run between all workers; its value is pickled next to the folder for the others and
    kept in this worker. A build that raised leaves no marker, so the next asker builds it again from an empty
    folder."""
    if name not in _BUILT:
        shared = _run_root(tmp_path_factory) / "shared"
        shared.mkdir(exist_ok=True)
        folder, value_file = shared / name, shared / f"{name}.value.pickle"
        with FileLock(str(shared / f"{name}.lock")):
            if value_file.exists():
                _BUILT[name] = pickle.loads(value_file.read_bytes())
            else:
                shutil.rmtree(folder, ignore_errors=True)
                _BUILT[name] = build(folder)
                value_file.write_bytes(pickle.dumps(_BUILT[name]))
    return _BUILT[name]


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
    folder = tmp_path_factory.mktemp("heldout")
    for path in gate_subset():
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_checkpoint(arch, preset) → path of a checkpoint built once per session."""

    def build(arch: str = "llava_next", preset: str = "ci") -> Path:
        def make(out: Path) -> Path:
            from pue.export.tiny_models import build_tiny_model

            return build_tiny_model(out, arch=arch, preset=preset, seed=0)

        return _once(tmp_path_factory, f"checkpoint-{arch}-{preset}", make)

    return build


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """fp32_bundle(arch, preset, exporter) → path of a gated FP32 bundle built once per session (gated on the gate
    subset for FULL_GATE_BUNDLES, on `small_gate()` otherwise)."""

    def build(arch: str = "llava_next", preset: str = "ci", exporter: str = "torchscript") -> Path:
        def export(out: Path) -> Path:
            from pue.export.onnx_bundle import export_onnx_bundle

            heldout = gate_subset() if (arch, preset, exporter) in FULL_GATE_BUNDLES else small_gate()
            export_onnx_bundle(tiny_checkpoint(arch, preset), out, exporter=exporter, heldout=heldout)
            return out

        return _once(tmp_path_factory, f"bundle-{arch}-{preset}-{exporter}", export)

    return build


@pytest.fixture(scope="session")
def qwen3_embedding_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Callable[..., Path]) -> Path:
    """The `qwen3_vl/ci` checkpoint exported with the Qwen3-VL-Embedding recipe, cut to `MATRYOSHKA_CUT` (a gated
    FP32 bundle with DeepStack, M-RoPE and a Matryoshka output; its gate on two held-out tiles), once per session."""
    from qwen_helpers import MATRYOSHKA_CUT, embedding_recipe, export_heldout

    from pue.export.onnx_bundle import export_onnx_bundle

    def export(folder: Path) -> Path:
        folder.mkdir()
        out = folder / "bundle"
        checkpoint, recipe = tiny_checkpoint("qwen3_vl", "ci"), embedding_recipe(folder)
        export_onnx_bundle(checkpoint, out, recipe=recipe, embedding_dim=MATRYOSHKA_CUT, heldout=export_heldout())
        return out

    return _once(tmp_path_factory, "qwen3-embedding", export)


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

    def build(precision: str, target: str = "onnxruntime") -> tuple[Path, Any]:
        def quantize(out: Path) -> tuple[Path, Any]:
            from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle

            options = QuantizeOptions(precision=precision, target=target, heldout=gate_subset(), **FAST_CALIBRATION)
            return out, quantize_bundle(fp32_bundle("llava_next", "ci"), out, options)

        return _once(tmp_path_factory, f"quantized-{precision}-{target}", quantize)

    return build


@pytest.fixture(scope="session")
def outlier_report(tmp_path_factory: pytest.TempPathFactory, fp32_bundle: Callable[..., Path]) -> Callable[..., Any]:
    """outlier_report(arch, preset, rotate=False) → `bundle_outliers` of that session bundle on 4 patches and 4
    captions, once per session (test_outliers.py and test_rotation.py measure the gains bundles alike); read only."""

    def measure(arch: str, preset: str, rotate: bool = False) -> Any:
        def report(_: Path) -> Any:
            from pue.calibration.outliers import bundle_outliers

            return bundle_outliers(fp32_bundle(arch, preset), num_patches=4, num_captions=4, rotate=rotate)

        return _once(tmp_path_factory, f"outliers-{arch}-{preset}-{'rotated' if rotate else 'plain'}", report)

    return measure
