"""One run record per process: `OUT/runs/<UTC time>-<host>-<pid>.json`, never a file two processes write.

It holds the arguments, the bundle's manifest sha256, and one entry per slide this process looked at: its status
(`done`, `skipped`: already done, `locked`: another process holds it, `failed`, `interrupted`), tiles embedded,
seconds and the error. It is rewritten atomically after every slide, so a killed process leaves a record that is
true up to its last finished slide.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pue import __version__

__all__ = ["RunRecord", "SlideRecord"]


@dataclass
class SlideRecord:
    slide_id: str
    path: str
    status: str
    tiles: int = 0
    grid_tiles: int = 0
    seconds: float = 0.0
    reader_seconds: float = 0.0
    error: str | None = None
    took_over_from: str | None = None


@dataclass
class RunRecord:
    runs_dir: Path
    arguments: dict[str, Any]
    bundle_sha256: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    slides: list[SlideRecord] = field(default_factory=list)
    finished: float | None = None
    state: str = "running"

    @property
    def path(self) -> Path:
        # microseconds in the name: one process may run the job twice within a second (the Python API, tests)
        micro = int(round(self.started * 1e6)) % 1_000_000
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.started)) + f".{micro:06d}Z"
        return self.runs_dir / f"{stamp}-{self.host}-{self.pid}.json"

    def add(self, slide: SlideRecord) -> None:
        self.slides.append(slide)
        self.save()

    def finish(self, state: str) -> None:
        self.state = state
        self.finished = time.time()
        self.save()

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for slide in self.slides:
            counts[slide.status] = counts.get(slide.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "pue_version": __version__,
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "finished": self.finished,
            "state": self.state,
            "bundle_sha256": self.bundle_sha256,
            "arguments": self.arguments,
            "counts": self.counts(),
            "slides": [asdict(slide) for slide in self.slides],
        }

    def save(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        final = self.path
        temporary = final.with_name(f".{final.name}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        os.replace(temporary, final)
