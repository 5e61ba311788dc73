"""Per-slide lock files, so several processes or machines over one output folder never embed a slide twice.

A lock is a file created with `O_CREAT | O_EXCL` (atomic on local filesystems and NFSv3+), holding the owner's
host, pid and start time as JSON. While the slide runs, a heartbeat thread touches it every `timeout / 4`
seconds. A lock is stale, and may be taken over, when its heartbeat is older than `timeout` (the owner hung or
its machine died) or when it was written on this host by a process that no longer exists (`kill -9`). Taking
over is serialised by a second `O_EXCL` file (`<lock>.takeover`), and the lock is checked stale again under it,
so two processes that both saw a stale lock cannot both take it, and a fresh lock is never stolen.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LockInfo", "SlideLock"]


@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    started: float

    @classmethod
    def read(cls, path: Path) -> LockInfo | None:
        try:
            data = json.loads(path.read_text())
            return cls(host=str(data["host"]), pid=int(data["pid"]), started=float(data["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


class SlideLock:
    """`acquire()` → True when this process now owns the slide; `release()` when done (also on errors)."""

    def __init__(self, path: Path, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"lock timeout must be positive, got {timeout}")
        self.path = path
        self.timeout = float(timeout)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.taken_over: LockInfo | None = None  # the stale owner this process replaced, if any
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if self._create():
            return True
        if not self._stale():
            return False
        takeover = self.path.with_name(self.path.name + ".takeover")
        if not _create_exclusive(takeover, self._payload()):
            if _age(takeover) > self.timeout:  # a taker that died mid-takeover
                takeover.unlink(missing_ok=True)
            return False
        try:
            if not self._stale():  # someone else took it over and is alive
                return False
            self.taken_over = LockInfo.read(self.path)
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            takeover.unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if LockInfo.read(self.path) == self._info:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # --- internals --------------------------------------------------------------------------------------
    def _create(self) -> bool:
        self._info = LockInfo(self.host, self.pid, time.time())
        if not _create_exclusive(self.path, self._payload()):
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return True

    def _payload(self) -> dict[str, Any]:
        info = getattr(self, "_info", LockInfo(self.host, self.pid, time.time()))
        return {"host": info.host, "pid": info.pid, "started": info.started}

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _stale(self) -> bool:
        age = _age(self.path)
        if age == float("inf"):
            return True  # released meanwhile
        if age > self.timeout:
            return True
        owner = LockInfo.read(self.path)
        return owner is not None and owner.host == self.host and not _alive(owner.pid)


def _create_exclusive(path: Path, payload: dict[str, Any]) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(payload))
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill(pid, 0) would terminate it: rely on the heartbeat
        return True
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
