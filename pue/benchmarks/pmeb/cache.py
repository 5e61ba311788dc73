"""Reference embeddings cached on disk, so the PyTorch reference runs once per task and checkpoint.

A cache entry is keyed by the task (its name, the sha256 of task.json and its data files, and the names and
sizes of its images: re-hashing a dataset's images on every run would cost more than it protects), the
checkpoint's weights sha256, the recipe, the tile size, the dtype and the output dimension (a Matryoshka cut).
Entries are `.npz` files (no pickles) written atomically; an unreadable entry is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pue.benchmarks.pmeb.tasks import Task

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_KEY_ENTRY = "__key__"


def default_cache_dir() -> Path:
    """`$PUE_CACHE_DIR/pmeb`, else `~/.cache/pue/pmeb`."""
    base = os.environ.get("PUE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "pue") / "pmeb"


def task_fingerprint(task: Task) -> str:
    digest = hashlib.sha256()
    for path in task.files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    for name in task.image_names():
        digest.update(f"{name}\0{task.image_path(name).stat().st_size}\n".encode())
    return digest.hexdigest()


def reference_key(
    task: Task, checkpoint_sha256: str, recipe: dict[str, Any], tile_size: int, dtype: str, embedding_dim: int
) -> str:
    identity = {
        "format": CACHE_FORMAT,
        "task": task.name,
        "data": task_fingerprint(task),
        "checkpoint": checkpoint_sha256,
        "recipe": recipe,
        "tile_size": int(tile_size),
        "dtype": dtype,
        "embedding_dim": int(embedding_dim),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class EmbeddingCache:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, task_name: str, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)
        return self.directory / f"{safe}-{key[:24]}.npz"

    def load(self, task_name: str, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(task_name, key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if str(stored[_KEY_ENTRY]) != key:
                    return None
                return {name: stored[name] for name in stored.files if name != _KEY_ENTRY}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("ignoring unreadable cache entry %s (%s); recomputing", path, exc)
            return None

    def save(self, task_name: str, key: str, embeddings: dict[str, np.ndarray]) -> Path:
        path = self.path(task_name, key)
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=self.directory)
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, **{_KEY_ENTRY: np.asarray(key)}, **embeddings)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path
