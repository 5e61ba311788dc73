"""What runs on the Ray cluster's workers for `pue-embed slides --engine ray` (none of it imports ray).

- `plan_slide`: a task per slide: open it, choose its tiles (`pue.embed.slide_plan`), describe them.
- `read_pixels`: a `map_batches` task per tile batch: read the batch's tiles from its slide and preprocess them
  exactly as the local engine's reader thread does (`load_tiles`, then the bundle's preprocessor).
- `EmbedPixels`: the callable class of the actor pool: one runtime session per actor, created once, that embeds
  each batch of pixel values (`Embedder.embed_pixel_values`, as the local engine does).
- `look_at_paths`: a task per node at start-up: does this node see the slides, the bundle and the output folder?

A batch travels as one dataset row: its slide's index, its first tile's index in the slide, the tile count, and its
arrays as raw bytes (pixels, features): batches differ in size (a slide's last one), and bytes columns keep Ray
Data from having to stack arrays of different shapes. A batch that cannot be read carries its error instead of
pixels, so one bad slide fails only itself (the driver records it), never the whole dataset.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pue.embed.inputs import SlideInput
from pue.embed.slide_plan import coords_attributes, slide_tiles
from pue.errors import PueError

__all__ = ["EmbedPixels", "look_at_paths", "plan_slide", "read_pixels"]


def plan_slide(slide: SlideInput, settings: Any) -> dict[str, Any]:
    """{"tiles": SlideTiles (without mask and thumbnail), "coords_attrs": …} or {"error": message} for a bad slide."""
    from pue.slides.readers import open_slide

    try:
        reader = open_slide(slide.path, settings.reader)
        try:
            tiles = slide_tiles(reader, slide, settings)
            return {
                "tiles": replace(tiles, mask=None, thumbnail=None),
                "coords_attrs": coords_attributes(slide, reader, tiles, settings),
            }
        finally:
            reader.close()
    except (PueError, OSError) as exc:
        return {"error": str(exc)}


def read_pixels(batch: dict[str, np.ndarray], bundle: str, reader: str) -> dict[str, Any]:
    """One tile batch (a row) → its preprocessed pixel values as bytes, or its error."""
    from pue.bundle import read_manifest
    from pue.runtime.images import load_tiles
    from pue.runtime.preprocess import ImagePreprocessor
    from pue.slides.readers import open_slide

    began = time.perf_counter()
    manifest = read_manifest(bundle)
    coords = np.frombuffer(batch["coords"][0], np.int64).reshape(-1, 2)
    start, extent, size = int(batch["start"][0]), int(batch["extent"][0]), int(batch["size"][0])
    pixels, shape, error = b"", np.zeros(0, np.int64), ""
    try:
        slide = open_slide(Path(str(batch["path"][0])), reader)
        try:
            tiles = [slide.read(int(x), int(y), extent, size) for x, y in coords]
        finally:
            slide.close()
        values = ImagePreprocessor(manifest.preprocessing)(load_tiles(tiles, int(manifest.tile_size), start))
        pixels, shape = np.ascontiguousarray(values, np.float32).tobytes(), np.asarray(values.shape, np.int64)
    except (PueError, OSError) as exc:
        error = f"tiles {start}-{start + len(coords) - 1}: {exc}"
    return {
        "slide": batch["slide"],
        "start": batch["start"],
        "count": np.array([len(coords)], np.int64),
        "pixels": np.array([pixels], dtype=object),
        "shape": np.array([shape.tobytes()], dtype=object),
        "error": np.array([error], dtype=object),
        "read_seconds": np.array([time.perf_counter() - began], np.float64),
    }


class EmbedPixels:
    """The actor pool's callable class: the session is created once per actor, in `__init__`."""

    def __init__(self, bundle: str, backend: str, device: str, threads: int | None) -> None:
        from pue.runtime import Embedder

        self.embedder = Embedder.load(bundle, backend=backend, device=device, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        features = b""
        if not batch["error"][0]:
            shape = tuple(np.frombuffer(batch["shape"][0], np.int64))
            pixels = np.frombuffer(batch["pixels"][0], np.float32).reshape(shape)
            features = np.ascontiguousarray(self.embedder.embed_pixel_values(pixels), np.float32).tobytes()
        return {
            "slide": batch["slide"],
            "start": batch["start"],
            "count": batch["count"],
            "features": np.array([features], dtype=object),
            "error": batch["error"],
            "read_seconds": batch["read_seconds"],
        }


def look_at_paths(expected: dict[str, Any]) -> dict[str, Any]:
    """What this node sees of the driver's paths: a list of problems (empty when it sees them all, as the driver)."""
    from pue.bundle import manifest_sha256

    problems = []
    for path, (size, mtime_ns) in expected["files"].items():
        try:
            stat = os.stat(path)
        except OSError:
            problems.append(f"{path} (not found)")
            continue
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
            problems.append(f"{path} (another file: {stat.st_size} bytes, the driver's has {size})")
    bundle, sha256 = expected["bundle"]
    try:
        if manifest_sha256(bundle) != sha256:
            problems.append(f"{bundle} (another bundle)")
    except OSError:
        problems.append(f"{bundle} (no bundle there)")
    probe, token = expected["probe"]
    try:
        if Path(probe).read_text() != token:
            problems.append(f"{Path(probe).parent} (another folder: the driver's probe file differs)")
    except OSError:
        problems.append(f"{Path(probe).parent} (the output folder: the driver's probe file is not there)")
    return {"host": socket.gethostname(), "problems": problems}
