"""The Ray engine on one local `ray.init(num_cpus=2)` per module, `ci` preset: the same files as the local engine
(byte for byte: the same batch composition on CPU gives the same vectors bit for bit), resume after its driver was
killed (no duplicated rows, nothing partial under a final name), a node that does not see a path stops the job with
one line. Under CI (PUE_REQUIRE_RAY=1, set by .ci/run) a missing Ray fails these tests instead of skipping them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from slide_files import require, tissue_slide_rgb, write_pyramid
from typer.testing import CliRunner

from pue.cli.embed_app import app
from pue.embed.inputs import SlideInput
from pue.errors import PueError

FEATURES = Path("20x_224px_0px_overlap") / "features_ci"
runner = CliRunner()


def _require_ray() -> Any:
    return require("ray", flag="PUE_REQUIRE_RAY", extras="ray,slides")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """One local Ray for the module: 2 CPUs, as a small workstation (one embedding actor, one CPU for reading)."""
    ray = _require_ray()
    require("openslide")
    # No metrics agent: on a busy 2-core machine its start-up outlasts the raylet's wait for it (measured here).
    previous = os.environ.get("RAY_enable_metrics_collection")
    os.environ["RAY_enable_metrics_collection"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_enable_metrics_collection", None)
        else:
            os.environ["RAY_enable_metrics_collection"] = previous


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openslide")
    require("h5py")
    folder = tmp_path_factory.mktemp("scans")
    for index in range(4):
        box = (0.1 + 0.05 * index, 0.2, 0.7 + 0.05 * index, 0.9)
        write_pyramid(folder / f"s{index}.tif", tissue_slide_rgb(1792, 1344, seed=index, box=box), mpp=0.25)
    return folder


def _arguments(scans: Path, out: Path, bundle: Path, *extra: str) -> list[str]:
    return ["slides", str(scans), "-o", str(out), "--bundle", str(bundle), "--name", "ci", "--threads", "1",
            "--batch-size", "4", "--json", *extra]  # fmt: skip


def _files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((out / FEATURES).glob("*.h5"))}


@pytest.fixture(scope="module")
def local_files(scans: Path, fp32_bundle: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("local") / "out"
    result = runner.invoke(app, _arguments(scans, out, fp32_bundle("llava_next", "ci")))
    assert result.exit_code == 0, result.output
    files = _files(out)
    assert len(files) == 4
    return files


def test_ray_engine_writes_the_local_engines_files(
    ray_cluster: Any, scans: Path, fp32_bundle: Callable[..., Path], local_files: dict, tmp_path: Path
) -> None:
    h5py = require("h5py")
    out = tmp_path / "ray"
    result = runner.invoke(app, _arguments(scans, out, fp32_bundle("llava_next", "ci"), "--engine", "ray"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["counts"] == {"done": 4} and summary["tiles"] > 16
    files = _files(out)
    for name, data in local_files.items():  # same batches on CPU: the same bits, so the same file bytes
        assert files[name] == data, name
    with h5py.File(out / FEATURES / "s0.h5", "r") as handle:
        assert handle["features"].shape[0] == handle["coords"].shape[0] > 0
    record = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert record["arguments"]["engine"] == "ray" and {s["status"] for s in record["slides"]} == {"done"}
    assert not list((out / FEATURES / ".locks").iterdir()) and not list((out / FEATURES).glob(".pue-ray-probe-*"))
    again = runner.invoke(app, _arguments(scans, out, fp32_bundle("llava_next", "ci"), "--engine", "ray"))
    assert json.loads(again.stdout[again.stdout.index("{") :])["counts"] == {"skipped": 4}


def test_killed_ray_driver_resumes_without_duplicates(
    ray_cluster: Any, scans: Path, fp32_bundle: Callable[..., Path], local_files: dict, tmp_path: Path
) -> None:
    h5py = require("h5py")
    bundle = fp32_bundle("llava_next", "ci")
    address = ray_cluster.get_runtime_context().gcs_address
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "pue.cli.embed_app", *_arguments(scans, out, bundle, "--engine", "ray",
               "--ray-address", address, "--ray-actors", "1")]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / FEATURES).glob("*.h5")) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = _files(out)
    assert 1 <= len(written) < 4, "the kill landed after the job ended; the test needs more slides"
    for name, data in written.items():  # nothing partial under a final name
        assert data == local_files[name]

    result = runner.invoke(app, _arguments(scans, out, bundle, "--engine", "ray"))
    assert result.exit_code == 0, result.output
    assert _files(out) == local_files
    for name in local_files:  # every tile once
        with h5py.File(out / FEATURES / name, "r") as handle:
            coords = handle["coords"][:]
        assert len({tuple(xy) for xy in coords.tolist()}) == len(coords)
    assert [p.name for p in (out / FEATURES).glob(".*")] == [".locks"]
    rerun = json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())
    statuses = Counter(slide["status"] for slide in rerun["slides"])
    assert statuses == {"skipped": len(written), "done": 4 - len(written)}
    assert sum(1 for slide in rerun["slides"] if slide["took_over_from"]) >= 1  # the killed driver's locks


def test_a_path_a_node_does_not_see_stops_the_job(
    ray_cluster: Any, scans: Path, fp32_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    from pue.embed.ray_engine import check_paths_visible

    bundle = fp32_bundle("llava_next", "ci")
    out = tmp_path / "out"
    out.mkdir()
    check_paths_visible(ray_cluster, [SlideInput("s0", scans / "s0.tif")], bundle, out)  # all visible: no error
    # /dev/fd/N is this process's open slide; a Ray worker's fd N is something else (or nothing)
    descriptor = os.open(scans / "s1.tif", os.O_RDONLY)
    try:
        hidden = SlideInput("s1", Path(f"/dev/fd/{descriptor}"))
        with pytest.raises(PueError, match=r"Ray node .* does not see the job's paths .*/dev/fd/") as caught:
            check_paths_visible(ray_cluster, [hidden], bundle, out)
    finally:
        os.close(descriptor)
    assert "every node must see the slides, the bundle and the output folder" in str(caught.value)
    assert not list(out.glob(".pue-ray-probe-*"))


def test_actor_pool_leaves_a_cpu_for_reading() -> None:
    from pue.embed.ray_engine import RayOptions, pool_size

    def cluster(**resources: float) -> SimpleNamespace:
        return SimpleNamespace(cluster_resources=lambda: resources)

    options = RayOptions(bundle=Path("b"))
    assert pool_size(cluster(CPU=2), options) == (1, 1, 0)
    assert pool_size(cluster(CPU=16), RayOptions(bundle=Path("b"), threads=4)) == (3, 4, 0)
    assert pool_size(cluster(CPU=8, GPU=2), RayOptions(bundle=Path("b"), device="cuda")) == (2, 1, 1)
    with pytest.raises(PueError, match="Ray gives each actor one GPU"):
        pool_size(cluster(CPU=8, GPU=2), RayOptions(bundle=Path("b"), device="cuda:1"))
    with pytest.raises(PueError, match="has no GPU"):
        pool_size(cluster(CPU=8), RayOptions(bundle=Path("b"), device="cuda"))
    assert np.prod(pool_size(cluster(CPU=3), RayOptions(bundle=Path("b"), threads=4))[:2]) == 4  # one actor


def test_ray_engine_runs_a_qwen3_bundle_like_the_local_engine(
    ray_cluster: Any, scans: Path, qwen3_embedding_bundle: Path, tmp_path: Path
) -> None:
    """A Qwen3-VL bundle (patch-layout vision input, DeepStack, M-RoPE, a Matryoshka cut) in Ray's actors: the same
    file bytes as the local engine on the same slide."""
    h5py = require("h5py")
    from qwen_helpers import MATRYOSHKA_CUT

    one = tmp_path / "scan"
    one.mkdir()
    (one / "s0.tif").symlink_to(scans / "s0.tif")
    written = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        result = runner.invoke(app, _arguments(one, out, qwen3_embedding_bundle, "--engine", engine))
        assert result.exit_code == 0, result.output
        written[engine] = _files(out)
    assert list(written["ray"]) == ["s0.h5"] and written["ray"] == written["local"]
    with h5py.File(tmp_path / "ray" / FEATURES / "s0.h5", "r") as handle:
        assert handle["features"].shape[1] == MATRYOSHKA_CUT and handle["features"].shape[0] > 0
