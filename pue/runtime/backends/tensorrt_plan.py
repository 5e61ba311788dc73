"""Plain-Python planning for the TensorRT backend: batch splitting, padding to a profile's minimum batch, device
buffer sizes (grow-only) and the device-to-device copies that place image features on their rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BUFFER_GRANULARITY = 1 << 20  # allocate in whole MiB
BUFFER_GROWTH = 1.5  # a buffer that must grow takes at least 1.5x its old size: sequence lengths creep up


def tensor_bytes(shape: tuple[int, ...], dtype: np.dtype | str) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def grown_capacity(current: int, needed: int, granularity: int = BUFFER_GRANULARITY) -> int:
    """The capacity a grow-only buffer holding `current` bytes takes to hold `needed` (never shrinks)."""
    if needed <= current:
        return current
    wanted = max(needed, int(current * BUFFER_GROWTH), 1)
    return -(-wanted // granularity) * granularity


@dataclass(frozen=True)
class BatchChunk:
    """Rows [start, stop) of a batch, the pixel entries [pixel_start, pixel_stop) of its image rows, and those
    rows' indices within the chunk."""

    start: int
    stop: int
    pixel_start: int
    pixel_stop: int
    image_rows: np.ndarray

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_batch(batch: int, image_rows: np.ndarray, max_batch: int) -> list[BatchChunk]:
    """Cut a batch into chunks of at most `max_batch` rows (the engine profile's maximum)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    rows = np.asarray(image_rows, dtype=np.int64).reshape(-1)
    chunks = []
    for start in range(0, batch, max_batch):
        stop = min(start + max_batch, batch)
        first, last = (int(i) for i in np.searchsorted(rows, [start, stop]))
        chunks.append(BatchChunk(start, stop, first, last, rows[first:last] - start))
    return chunks


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with its last row repeated until it has `rows` rows (a profile's minimum batch); padded rows'
    outputs are dropped by the caller."""
    if len(array) >= rows:
        return array
    if len(array) == 0:
        raise ValueError("cannot pad an empty batch")
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])


def pad_image_rows(image_rows: np.ndarray, batch: int, padded_batch: int) -> np.ndarray:
    """Image rows after `pad_rows` repeated the last row: each copy holds as many images as the last row did."""
    rows = np.asarray(image_rows, dtype=np.int64)
    if padded_batch <= batch or len(rows) == 0 or rows[-1] != batch - 1:
        return rows
    per_row = int(np.count_nonzero(rows == batch - 1))
    return np.concatenate([rows, np.repeat(np.arange(batch, padded_batch, dtype=np.int64), per_row)])


def row_runs(image_rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(destination row, source row, count) for each run of consecutive image rows: one device copy per run.

    Source row k is the k-th image of the vision output; destination is its row of the decoder batch.
    """
    runs: list[tuple[int, int, int]] = []
    for source, row in enumerate(int(r) for r in image_rows):
        if runs and runs[-1][0] + runs[-1][2] == row:
            destination, first, count = runs[-1]
            runs[-1] = (destination, first, count + 1)
        else:
            runs.append((row, source, 1))
    return runs
