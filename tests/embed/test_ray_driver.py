"""The Ray engine's driver on an in-process stand-in for Ray (`ray_fake`), `ci` preset: byte-identical files to the
local engine (the same batches per slide), the resume rule (finished slides skipped, a dead driver's lock and
temporary file taken over), bad slides, and the start-up path check. Needs no Ray; test_ray_engine.py runs the same
engine on a real local Ray."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from ray_fake import fake_ray
from slide_files import require, tissue_slide_rgb, truncated_copy, write_pyramid
from typer.testing import CliRunner

from pue.cli.embed_app import app
from pue.embed.inputs import SlideInput
from pue.errors import PueError

FEATURES = Path("20x_224px_0px_overlap") / "features_ci"
runner = CliRunner()


@pytest.fixture()
def on_fake_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import pue.embed.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "_import_ray", lambda: fake_ray(cpus=2))


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("openslide")
    require("h5py")
    folder = tmp_path_factory.mktemp("scans")
    for index in range(2):
        box = (0.1 + 0.1 * index, 0.2, 0.6 + 0.1 * index, 0.8)
        write_pyramid(folder / f"s{index}.tif", tissue_slide_rgb(1792, 1344, seed=index, box=box), mpp=0.25)
    write_pyramid(folder / "glass.tif", tissue_slide_rgb(1024, 1024, seed=5), mpp=0.5, levels=2)
    return folder


def _embed(scans: Path, out: Path, bundle: Path, *extra: str):
    return runner.invoke(app, ["slides", str(scans), "-o", str(out), "--bundle", str(bundle), "--name", "ci",
                               "--threads", "1", "--batch-size", "4", "--json", *extra])  # fmt: skip


def _files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((out / FEATURES).glob("*.h5"))}


@pytest.fixture(scope="module")
def local_files(scans: Path, fp32_bundle: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("local") / "out"
    result = _embed(scans, out, fp32_bundle("llava_next", "ci"))
    assert result.exit_code == 0, result.output
    files = _files(out)
    files["folder"] = out / FEATURES  # type: ignore[assignment]
    return files


def local_out(local_files: dict) -> Path:
    return local_files["folder"]


def _summary(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_ray_driver_writes_the_local_engines_files(
    on_fake_ray: None, scans: Path, fp32_bundle: Callable[..., Path], local_files: dict, tmp_path: Path
) -> None:
    bundle = fp32_bundle("llava_next", "ci")
    out = tmp_path / "out"
    result = _embed(scans, out, bundle, "--engine", "ray")
    assert result.exit_code == 0, result.output
    summary = _summary(result)
    assert summary["counts"] == {"done": 3} and summary["tiles"] > 8 and summary["wall_tiles_per_s"] > 0
    assert (
        _files(out) == {k: v for k, v in local_files.items() if k != "folder"} and len(_files(out)) == 3
    )  # glass.h5 included: a (0, D) file
    assert not list((out / FEATURES / ".locks").iterdir()) and not list((out / FEATURES).glob(".pue-ray-probe-*"))
    again = _embed(scans, out, bundle, "--engine", "ray")
    assert _summary(again)["counts"] == {"skipped": 3}


def test_ray_driver_resumes_a_killed_run(
    on_fake_ray: None, scans: Path, fp32_bundle: Callable[..., Path], local_files: dict, tmp_path: Path
) -> None:
    bundle = fp32_bundle("llava_next", "ci")
    out = tmp_path / "out"
    # as a killed driver leaves it: s0 finished; s1 locked by a dead pid, with its temporary file half written
    assert _embed(scans / "s0.tif", out, bundle).exit_code == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, pid = socket.gethostname(), int(dead.stdout)
    (out / FEATURES / ".locks" / "s1.lock").write_text(json.dumps({"host": host, "pid": pid, "started": 0.0}))
    (out / FEATURES / f".s1.h5.tmp-{host}-{pid}").write_bytes(b"partial")
    result = _embed(scans, out, bundle, "--engine", "ray")
    assert result.exit_code == 0, result.output
    assert _files(out) == {k: v for k, v in local_files.items() if k != "folder"}
    assert [p.name for p in (out / FEATURES).glob(".*")] == [".locks"]  # the dead driver's temporary file is gone
    record = json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())
    statuses = {slide["slide_id"]: slide["status"] for slide in record["slides"]}
    assert statuses == {"s0": "skipped", "s1": "done", "glass": "done"}
    assert [s["took_over_from"] for s in record["slides"] if s["slide_id"] == "s1"] == [f"{host}:{pid}"]


def test_ray_driver_records_a_bad_slide(
    on_fake_ray: None, scans: Path, fp32_bundle: Callable[..., Path], local_files: dict, tmp_path: Path
) -> None:
    bundle = fp32_bundle("llava_next", "ci")
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("s0.tif", "glass.tif"):
        (folder / name).write_bytes((scans / name).read_bytes())
    truncated_copy(scans / "s1.tif", folder / "bad.tif", fraction=0.5)
    out = tmp_path / "out"
    stopped = _embed(folder, out, bundle, "--engine", "ray")
    assert stopped.exit_code == 1 and "slide bad" in stopped.output and "--skip-errors" in stopped.output
    result = _embed(folder, out, bundle, "--engine", "ray", "--skip-errors")
    assert result.exit_code == 1
    summary = _summary(result)
    assert Counter(summary["counts"]) == Counter({"done": 2}) + Counter({"failed": 1})
    assert [failure["slide_id"] for failure in summary["failed"]] == ["bad"]
    h5py = require("h5py")
    assert sorted(_files(out)) == ["glass.h5", "s0.h5"]  # copies: another source mtime in pue_job, so compare data
    with h5py.File(out / FEATURES / "s0.h5", "r") as ray_file, h5py.File(local_out(local_files) / "s0.h5", "r") as ref:
        assert (ray_file["features"][:] == ref["features"][:]).all() and (
            ray_file["coords"][:] == ref["coords"][:]
        ).all()


def test_a_node_that_does_not_see_a_path_stops_the_job(
    scans: Path, fp32_bundle: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pue.embed.ray_tasks as ray_tasks
    from pue.bundle import manifest_sha256
    from pue.embed.ray_engine import check_paths_visible

    bundle = fp32_bundle("llava_next", "ci")
    slide = scans / "s0.tif"
    stat = slide.stat()
    probe = tmp_path / ".probe"
    probe.write_text("token")
    expected = {"files": {str(slide): (stat.st_size, stat.st_mtime_ns)},
                "bundle": (str(bundle), manifest_sha256(bundle)), "probe": (str(probe), "token")}  # fmt: skip
    assert ray_tasks.look_at_paths(expected)["problems"] == []
    elsewhere = {"files": {str(slide): (stat.st_size + 1, stat.st_mtime_ns), str(tmp_path / "gone.svs"): (1, 1)},
                 "bundle": (str(tmp_path), "0" * 64), "probe": (str(probe), "another token")}  # fmt: skip
    problems = ray_tasks.look_at_paths(elsewhere)["problems"]
    assert len(problems) == 4 and "gone.svs (not found)" in problems[1] and "another file" in problems[0]
    assert "(no bundle there)" in problems[2] and "probe file differs" in problems[3]

    out = tmp_path / "out"
    out.mkdir()
    ray = fake_ray()
    check_paths_visible(ray, [SlideInput("s0", slide)], bundle, out)  # this process sees everything
    blind = {"host": "node-2", "problems": [f"{slide} (not found)"]}
    monkeypatch.setattr(ray_tasks, "look_at_paths", lambda expected: blind)
    with pytest.raises(PueError, match=r"Ray node 127.0.0.1 does not see the job's paths .*s0.tif \(not found\)"):
        check_paths_visible(ray, [SlideInput("s0", slide)], bundle, out)
    assert not list(out.iterdir())  # the probe file is removed either way
    assert hashlib.sha256(slide.read_bytes()).hexdigest() and os.path.exists(slide)
