"""Data shipped with pue: the default recipe and real pathology sample patches.

The patches (``patches/``, described by ``patches/index.json`` and ``patches/PROVENANCE.md``) come in three
spatially disjoint sets: ``calibration`` (INT8 calibration), ``heldout`` (parity and accuracy checks on
tissue calibration never saw) and ``background`` (glass). Stdlib only, so importing this costs nothing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pue.errors import PueError

__all__ = ["data_dir", "default_recipe_path", "patch_index", "patch_set", "patches_dir"]


def data_dir() -> Path:
    """The folder holding pue's packaged data files."""
    return Path(__file__).resolve().parent


def patches_dir() -> Path:
    """The folder holding the sample patches and their index."""
    return data_dir() / "patches"


def default_recipe_path() -> Path:
    """The bundled E5-V (MLLM4PUE) export recipe."""
    return data_dir() / "recipe_e5v.json"


@lru_cache(maxsize=1)
def _index() -> dict[str, Any]:
    path = patches_dir() / "index.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PueError(f"sample patch index not found at {path}", hint="reinstall pue") from None


def patch_index() -> list[dict[str, Any]]:
    """One dict per sample patch (file relative to patches_dir(), set, source, x, y, size, stain, ...)."""
    # Copies, so a caller editing an entry cannot change what the next caller sees through the cache.
    return [dict(entry) for entry in _index()["patches"]]


def patch_set(name: str) -> list[Path]:
    """Sorted paths of the patches in one set ("calibration", "heldout" or "background")."""
    known = sorted(_index()["counts"])
    if name not in known:
        raise PueError(f"unknown patch set {name!r}; known sets: {', '.join(known)}")
    root = patches_dir()
    return sorted(root / entry["file"] for entry in _index()["patches"] if entry["set"] == name)
