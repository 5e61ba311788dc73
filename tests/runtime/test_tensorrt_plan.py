"""Batch splitting, padding to a profile's minimum, grow-only buffer sizes and feature-placement copies."""

from __future__ import annotations

import numpy as np
import pytest

from pue.runtime.backends.tensorrt_plan import (
    BUFFER_GRANULARITY,
    grown_capacity,
    pad_image_rows,
    pad_rows,
    row_runs,
    split_batch,
    tensor_bytes,
)

MIB = BUFFER_GRANULARITY


def test_split_batch_keeps_image_rows_with_their_pixels():
    chunks = split_batch(7, np.array([0, 2, 3, 6]), max_batch=3)
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 6), (6, 7)]
    assert [(c.pixel_start, c.pixel_stop) for c in chunks] == [(0, 2), (2, 3), (3, 4)]
    assert [c.image_rows.tolist() for c in chunks] == [[0, 2], [0], [0]]
    assert sum(c.size for c in chunks) == 7


def test_split_batch_within_the_limit_is_one_chunk():
    (chunk,) = split_batch(4, np.array([], dtype=np.int64), max_batch=32)
    assert (chunk.start, chunk.stop, chunk.pixel_start, chunk.pixel_stop) == (0, 4, 0, 0)
    assert chunk.image_rows.tolist() == []
    with pytest.raises(ValueError):
        split_batch(4, np.array([0]), max_batch=0)


def test_pad_rows_repeats_the_last_row():
    ids = np.array([[1, 2], [3, 4]])
    assert pad_rows(ids, 4).tolist() == [[1, 2], [3, 4], [3, 4], [3, 4]]
    assert pad_rows(ids, 1) is ids
    with pytest.raises(ValueError):
        pad_rows(ids[:0], 2)


def test_padded_copies_of_an_image_row_are_image_rows():
    assert pad_image_rows(np.array([0, 2]), 3, 5).tolist() == [0, 2, 3, 4]
    assert pad_image_rows(np.array([0, 1]), 3, 5).tolist() == [0, 1]  # the last row is a text
    assert pad_image_rows(np.array([], dtype=np.int64), 3, 5).tolist() == []
    assert pad_image_rows(np.array([2]), 3, 3).tolist() == [2]
    assert pad_image_rows(np.array([0, 2, 2]), 3, 5).tolist() == [0, 2, 2, 3, 3, 4, 4]  # copies of a 2-image row


def test_row_runs_coalesce_consecutive_rows():
    assert row_runs(np.array([1, 2, 3, 5, 7, 8])) == [(1, 0, 3), (5, 3, 1), (7, 4, 2)]
    assert row_runs(np.array([0])) == [(0, 0, 1)]
    assert row_runs(np.array([], dtype=np.int64)) == []


def test_buffers_only_grow_in_whole_mib_and_by_at_least_half():
    assert grown_capacity(0, 1) == MIB
    assert grown_capacity(0, MIB + 1) == 2 * MIB
    assert grown_capacity(4 * MIB, 3 * MIB) == 4 * MIB  # enough: keep it
    assert grown_capacity(4 * MIB, 4 * MIB + 1) == 6 * MIB  # 1.5x, not just the extra byte
    assert grown_capacity(4 * MIB, 20 * MIB) == 20 * MIB


def test_tensor_bytes():
    assert tensor_bytes((8, 1176, 4096), np.float16) == 8 * 1176 * 4096 * 2
    assert tensor_bytes((2, 3), "int64") == 48
