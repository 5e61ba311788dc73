"""pue-embed watch: a slide written slowly is embedded once, only after it stopped changing for --settle seconds;
SIGTERM and SIGINT stop the watcher cleanly (exit 0, run record closed); a restart picks up where it stopped."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from slide_files import require, tissue_slide_rgb, write_pyramid

from pue.embed.watch import FolderWatcher

FEATURES = Path("20x_224px_0px_overlap") / "features_ci"


def test_watcher_waits_for_a_stable_signature(tmp_path: Path) -> None:
    now = [0.0]
    watcher = FolderWatcher(tmp_path, settle=5.0, clock=lambda: now[0])
    slide = tmp_path / "s1.svs"
    slide.write_bytes(b"a" * 10)
    (tmp_path / ".s2.svs.part").write_bytes(b"hidden")
    assert watcher.ready() == []  # first seen
    now[0] = 4.0
    assert watcher.ready() == []
    slide.write_bytes(b"a" * 20)  # still being written: the clock restarts
    now[0] = 6.0
    assert watcher.ready() == []
    now[0] = 10.0
    assert watcher.ready() == []
    now[0] = 11.0
    assert [s.slide_id for s in watcher.ready()] == ["s1"]
    now[0] = 30.0
    assert watcher.ready() == []  # handed out once
    # an MRXS slide: its data folder's files count too; a DICOM folder is one slide
    (tmp_path / "m.mrxs").write_bytes(b"index")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Data0000.dat").write_bytes(b"1")
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "level0.dcm").write_bytes(b"d")
    assert watcher.ready() == []
    (tmp_path / "m" / "Data0001.dat").write_bytes(b"2")
    now[0] = 36.0
    assert [s.slide_id for s in watcher.ready()] == ["dicom"]
    now[0] = 41.0
    assert [s.slide_id for s in watcher.ready()] == ["m"]


def _wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _watch(folder: Path, out: Path, bundle: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "pue.cli.embed_app", "watch", str(folder), "-o", str(out), "--bundle",
               str(bundle), "--name", "ci", "--settle", "1.5", "--poll", "0.2", "--threads", "1", "--json"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watch_embeds_a_slowly_written_slide_once(fp32_bundle: Callable[..., Path], tmp_path: Path) -> None:
    require("openslide")
    require("h5py")
    bundle = fp32_bundle("llava_next", "ci")
    source = write_pyramid(tmp_path / "source.tif", tissue_slide_rgb(1792, 1344, box=(0.2, 0.2, 0.8, 0.8)), mpp=0.25)
    folder, out = tmp_path / "scanner", tmp_path / "out"
    folder.mkdir()
    process = _watch(folder, out, bundle)
    try:
        data = source.read_bytes()
        with (folder / "s1.tif").open("wb") as handle:  # the scanner writes for ~2 s
            for start in range(0, len(data), len(data) // 10 + 1):
                handle.write(data[start : start + len(data) // 10 + 1])
                handle.flush()
                time.sleep(0.2)
        assert _wait_for(lambda: (out / FEATURES / "s1.h5").is_file(), 120)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    summary = json.loads(stdout[stdout.index("{") :])
    assert summary["state"] == "stopped" and summary["counts"] == {"done": 1}  # never tried on a partial file

    # a restart skips nothing twice and takes the next slide; SIGINT stops it the same way
    restarted = _watch(folder, out, bundle)
    try:
        shutil.copy(source, folder / "s2.tif")
        assert _wait_for(lambda: (out / FEATURES / "s2.h5").is_file(), 120)
        restarted.send_signal(signal.SIGINT)
        stdout, stderr = restarted.communicate(timeout=60)
    finally:
        restarted.kill()
    assert restarted.returncode == 0, stderr
    counts = json.loads(stdout[stdout.index("{") :])["counts"]
    assert counts == {"skipped": 1, "done": 1}
    assert (out / FEATURES / "s1.h5").read_bytes() != b"" and not list((out / FEATURES / ".locks").iterdir())
