"""Which items `torch.topk` puts in a row's top k when scores tie, reproduced in numpy (HOMIE's Recall@k).

HOMIE counts a record as a hit at k when its positive is among the indices `torch.topk(scores, k)` returns, so
on ties the answer depends on which of the tied items torch keeps. Read from PyTorch's sources (2.x):

* **CUDA** (`aten/src/ATen/native/cuda/TensorTopK.cu`, the single- and multi-block radix-select kernels, where
  HOMIE's `eval_path.py` computes its metrics: `batchify` moves the scores to the accelerator): every item scoring
  strictly above the k-th largest value is kept, then the items *equal* to it in **index order**, lowest first,
  until k are kept. So among equal scores the lowest gallery index wins. (Not covered: the sort-based path CUDA
  takes for at most 10 rows of at least 100,000 items.)
* **CPU** (`aten/src/ATen/native/TopKImpl.h`): `std::partial_sort` when `k * 64 <= n`, otherwise
  `std::nth_element` (then a sort of the first k - 1), with the comparator `a > b`. Which tied items end up in
  the first k is whatever libstdc++'s heap select / introselect leaves there: not index order (four equal scores,
  k = 1 → index 2). `_libstdcxx_top_k` below replays those algorithms step by step.

`"cuda"` is the default (HOMIE's published runs are GPU runs); `"cpu"` reproduces a CPU run of HOMIE's code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TIE_ORDERS = ("cuda", "cpu")
_CHUNK = 1024  # rows per step


def topk_hits(scores: np.ndarray, positives: np.ndarray, k: int, tie_order: str = "cuda") -> np.ndarray:
    """Per row: is column `positives[row]` among the indices `torch.topk(scores[row], k)` returns?"""
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=np.int64)
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"unknown tie order {tie_order!r}; use one of {TIE_ORDERS}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k = {k} is outside 1..{scores.shape[1]} (torch.topk refuses it)")
    hits = np.empty(scores.shape[0], dtype=bool)
    columns = np.arange(scores.shape[1])[None, :]
    for start in range(0, scores.shape[0], _CHUNK):  # bounds the memory of the boolean masks
        block, own_index = scores[start : start + _CHUNK], positives[start : start + _CHUNK]
        own = block[np.arange(len(block)), own_index][:, None]
        greater = (block > own).sum(axis=1)
        equal = block == own
        if tie_order == "cuda":
            hits[start : start + len(block)] = greater + (equal & (columns < own_index[:, None])).sum(axis=1) < k
            continue
        fits = greater + equal.sum(axis=1) <= k  # every tied item fits: no choice to make
        for row in np.flatnonzero((greater < k) & ~fits):  # the positive ties at the k-th place: replay libstdc++
            fits[row] = own_index[row] in _libstdcxx_top_k(block[row].tolist(), k)
        hits[start : start + len(block)] = fits
    return hits


def top1(scores: np.ndarray, tie_order: str = "cuda") -> np.ndarray:
    """The index `torch.topk(scores, 1)` (row-wise) returns: the lowest index among equal maxima on CUDA."""
    scores = np.asarray(scores)
    first = scores.argmax(axis=1)
    if tie_order == "cuda":
        return first
    out = first.copy()
    tied = np.flatnonzero((scores == scores.max(axis=1, keepdims=True)).sum(axis=1) > 1)
    for row in tied:
        out[row] = next(iter(_libstdcxx_top_k(scores[row].tolist(), 1)))
    return out


# --- libstdc++'s selection algorithms, as torch's CPU topk calls them (comparator: a > b) ----------------
_Comp = Callable[[tuple[float, int], tuple[float, int]], bool]


def _greater(x: tuple[float, int], y: tuple[float, int]) -> bool:
    return x[0] > y[0]


def _libstdcxx_top_k(values: list[float], k: int) -> set[int]:
    """The indices in the first k slots after torch's CPU topk (std::partial_sort or std::nth_element)."""
    a = [(v, i) for i, v in enumerate(values)]
    n = len(a)
    if k * 64 <= n:
        _heap_select(a, 0, k, n, _greater)  # partial_sort = heap select, then sort_heap (which keeps the set)
    else:
        _introselect(a, 0, k - 1, n, 2 * (n.bit_length() - 1), _greater)
    return {index for _, index in a[:k]}


def _adjust_heap(a: list, first: int, hole: int, length: int, value: tuple, comp: _Comp) -> None:
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if comp(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2  # __push_heap
    while hole > top and comp(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _heap_select(a: list, first: int, middle: int, last: int, comp: _Comp) -> None:
    length = middle - first
    if length >= 2:  # __make_heap
        parent = (length - 2) // 2
        while True:
            _adjust_heap(a, first, parent, length, a[first + parent], comp)
            if parent == 0:
                break
            parent -= 1
    for i in range(middle, last):
        if comp(a[i], a[first]):  # __pop_heap(first, middle, i)
            value = a[i]
            a[i] = a[first]
            _adjust_heap(a, first, 0, length, value, comp)


def _introselect(a: list, first: int, nth: int, last: int, depth: int, comp: _Comp) -> None:
    while last - first > 3:
        if depth == 0:
            _heap_select(a, first, nth + 1, last, comp)
            a[first], a[nth] = a[nth], a[first]
            return
        depth -= 1
        cut = _partition_pivot(a, first, last, comp)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(a, first, last, comp)


def _partition_pivot(a: list, first: int, last: int, comp: _Comp) -> int:
    mid = first + (last - first) // 2
    x, y, z = first + 1, mid, last - 1  # __move_median_to_first(first, first + 1, mid, last - 1)
    if comp(a[x], a[y]):
        median = y if comp(a[y], a[z]) else z if comp(a[x], a[z]) else x
    elif comp(a[x], a[z]):
        median = x
    elif comp(a[y], a[z]):
        median = z
    else:
        median = y
    a[first], a[median] = a[median], a[first]
    low, high = first + 1, last  # __unguarded_partition around a[first]
    while True:
        while comp(a[low], a[first]):
            low += 1
        high -= 1
        while comp(a[first], a[high]):
            high -= 1
        if not low < high:
            return low
        a[low], a[high] = a[high], a[low]
        low += 1


def _insertion_sort(a: list, first: int, last: int, comp: _Comp) -> None:
    for i in range(first + 1, last):
        value = a[i]
        if comp(value, a[first]):
            a[first + 1 : i + 1] = a[first:i]
            a[first] = value
        else:  # __unguarded_linear_insert
            j = i
            while comp(value, a[j - 1]):
                a[j] = a[j - 1]
                j -= 1
            a[j] = value
