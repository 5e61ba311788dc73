"""Per-slide locks: O_EXCL, heartbeat, takeover of dead or silent owners, never of live ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pue.embed.locks import LockInfo, SlideLock


def _foreign_lock(path: Path, host: str, pid: int, age: float = 0.0) -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age}))
    os.utime(path, (time.time() - age, time.time() - age))


def test_one_owner_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "s.lock"
    first, second = SlideLock(path, 60), SlideLock(path, 60)
    assert first.acquire()
    info = LockInfo.read(path)
    assert info is not None and info.pid == os.getpid()
    assert not second.acquire()  # held by a live process on this host
    first.release()
    assert not path.exists()
    assert second.acquire() and second.taken_over is None
    second.release()


def test_dead_owner_on_this_host_is_taken_over(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    path = tmp_path / "s.lock"
    lock = SlideLock(path, 3600)
    _foreign_lock(path, lock.host, dead_pid)
    assert lock.acquire()
    assert lock.taken_over is not None and lock.taken_over.pid == dead_pid
    assert LockInfo.read(path).pid == os.getpid()
    lock.release()


def test_silent_owner_elsewhere_is_taken_over_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "s.lock"
    _foreign_lock(path, "other-machine", 1, age=5.0)
    assert not SlideLock(path, 60).acquire()  # another host, heartbeat 5 s old: still running
    lock = SlideLock(path, 2)
    assert lock.acquire() and lock.taken_over.host == "other-machine"
    lock.release()
    # a takeover in progress (its marker file fresh) is not raced
    _foreign_lock(path, "other-machine", 1, age=5.0)
    path.with_name("s.lock.takeover").write_text("{}")
    assert not SlideLock(path, 2).acquire()


def test_heartbeat_keeps_a_long_slide_alive(tmp_path: Path) -> None:
    path = tmp_path / "s.lock"
    with SlideLock(path, 0.4) as lock:
        assert lock.acquire()
        os.utime(path, (time.time() - 10, time.time() - 10))
        time.sleep(0.35)  # a beat every 0.1 s
        assert time.time() - path.stat().st_mtime < 0.3
        other = SlideLock(path, 0.4)
        other.host = "other-machine"  # seen from another host: only the heartbeat tells it is alive
        assert not other.acquire()
    assert not path.exists()


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        SlideLock(tmp_path / "s.lock", 0)
