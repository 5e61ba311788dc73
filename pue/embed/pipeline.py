"""A bounded prefetch pipeline: a reader thread reads and preprocesses the next batches while inference runs.

The reader thread reads each batch's tiles from the slide (best pyramid level, resized), brings them to the
bundle's tile size and computes their pixel values; the calling thread runs the graphs (`embed_pixel_values`;
onnxruntime releases the GIL while it computes). At most `prefetch` batches wait in the queue, so memory stays
bounded whatever the slide's size. The reader's own busy time is measured, so a slow disk shows as reader-only
tiles/s below the job's tiles/s.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pue.errors import PueError
from pue.runtime.images import load_tiles
from pue.slides.readers import SlideReader

__all__ = ["Interrupted", "PipelineStats", "embed_tiles"]


class Interrupted(PueError):
    """The job was asked to stop (SIGINT / SIGTERM) in the middle of a slide."""

    exit_code = 130


@dataclass
class PipelineStats:
    tiles: int = 0
    seconds: float = 0.0  # wall time of the slide's embedding
    reader_seconds: float = 0.0  # the reader thread's busy time: reading, resizing, preprocessing
    inference_seconds: float = 0.0  # the calling thread's time in the graphs

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    @property
    def reader_tiles_per_s(self) -> float:
        return self.tiles / self.reader_seconds if self.reader_seconds > 0 else 0.0


_DONE = object()


def embed_tiles(
    reader: SlideReader,
    coords: np.ndarray,
    extent: int,
    patch_size: int,
    embedder: Any,
    batch_size: int,
    prefetch: int = 2,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, PipelineStats]:
    """Embeddings float32 (N, D) of the `extent`-sized level-0 squares at `coords`, read as `patch_size` tiles."""
    total = int(coords.shape[0])
    features = np.empty((total, embedder.dimension), np.float32)
    stats = PipelineStats(tiles=total)
    if total == 0:
        return features, stats
    batches: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    tile_size = int(embedder.manifest.tile_size)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read_batches() -> None:
        try:
            for start in range(0, total, batch_size):
                began = time.perf_counter()
                chunk = coords[start : start + batch_size]
                tiles = [reader.read(int(x), int(y), extent, patch_size) for x, y in chunk]
                pixels = embedder.preprocessor(load_tiles(tiles, tile_size, start))
                stats.reader_seconds += time.perf_counter() - began
                if not put((start, pixels)):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the calling thread, which raises it
            put(exc)

    started = time.perf_counter()
    thread = threading.Thread(target=read_batches, name="slide reader", daemon=True)
    thread.start()
    try:
        while True:
            if should_stop is not None and should_stop():
                raise Interrupted("interrupted in the middle of a slide; its partial output was discarded")
            item = batches.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            start, pixels = item
            began = time.perf_counter()
            features[start : start + pixels.shape[0]] = embedder.embed_pixel_values(pixels)
            stats.inference_seconds += time.perf_counter() - began
            if on_batch is not None:
                on_batch(int(pixels.shape[0]))
    finally:
        stop.set()
        thread.join()
    stats.seconds = time.perf_counter() - started
    return features, stats
