"""PMEB metrics in plain numpy: Recall@k with a fixed tie rule, accuracy, balanced accuracy, weighted F1.

Ties (equal similarity scores) are broken **against** the correct items: a query's rank is 1 + the number of
wrong gallery items scoring at least as high as its best correct item. So a hit never depends on gallery
order, and a model that gives everything the same score gets no credit. Correct items tied with each other
do not push each other down (any correct item in the top k is a hit, as in HOMIE's `recall_at_k`).
Top-1 *predictions* (what prediction agreement compares) take the lowest gallery index among equal scores.
Balanced accuracy and weighted F1 equal scikit-learn's (tests/benchmarks/test_pmeb_homie.py checks them), which
pue does not need at run time. HOMIE's record-level metrics and torch.topk's tie rule: homie.py and topk.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
_CHUNK = 1024  # query rows per step, to bound the memory of the boolean masks


def retrieval_ranks(similarity: np.ndarray, relevant: Sequence[Iterable[int]]) -> np.ndarray:
    """Pessimistic 1-based rank of each query's best correct item (see the module docstring)."""
    scores = np.asarray(similarity)
    if scores.ndim != 2:
        raise ValueError(f"similarity must be 2-D (queries × gallery), got shape {scores.shape}")
    if len(relevant) != scores.shape[0]:
        raise ValueError(f"{len(relevant)} lists of correct items for {scores.shape[0]} queries")
    if not np.all(np.isfinite(scores)):
        raise ValueError("similarity holds NaN or infinite values")
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    for start in range(0, scores.shape[0], _CHUNK):
        block = scores[start : start + _CHUNK]
        correct = np.zeros(block.shape, dtype=bool)
        for row, items in enumerate(relevant[start : start + _CHUNK]):
            items = list(items)
            if not items:
                raise ValueError(f"query {start + row} has no correct item")
            correct[row, items] = True
        best = np.where(correct, block, -np.inf).max(axis=1, keepdims=True)
        ranks[start : start + len(block)] = 1 + ((block >= best) & ~correct).sum(axis=1)
    return ranks


def recall_at_k(
    similarity: np.ndarray, gt_index_lists: Sequence[Iterable[int]], ks: Iterable[int] = DEFAULT_KS
) -> dict[int, float]:
    """Share of queries with a correct item in the top k, for each k (ties per the module docstring).

    `similarity` is queries × gallery; `gt_index_lists[q]` the gallery indices correct for query q.
    """
    ranks = retrieval_ranks(similarity, gt_index_lists)
    return {int(k): float(np.mean(ranks <= k)) for k in ks}


def top1(similarity: np.ndarray) -> np.ndarray:
    """The gallery index each query retrieves first (lowest index among equal scores)."""
    return np.asarray(similarity).argmax(axis=1)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    true, pred = _pair(y_true, y_pred)
    return float(np.mean(true == pred))


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean recall over the classes present in `y_true` (as scikit-learn's `balanced_accuracy_score`)."""
    true, pred = _pair(y_true, y_pred)
    recalls = [np.mean(pred[true == c] == c) for c in np.unique(true)]
    return float(np.mean(recalls))


def weighted_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Per-class F1 averaged with weights = each class's share of `y_true` (scikit-learn's average="weighted").

    Classes only ever predicted weigh 0; a class with no true positive has F1 0.
    """
    true, pred = _pair(y_true, y_pred)
    total = 0.0
    for c in np.unique(np.concatenate([true, pred])):
        tp = float(np.sum((true == c) & (pred == c)))
        support = float(np.sum(true == c))
        predicted = float(np.sum(pred == c))
        f1 = 0.0 if tp == 0 else 2 * tp / (support + predicted)
        total += f1 * support
    return total / len(true)


def top2_margin(scores: np.ndarray) -> np.ndarray:
    """Per query (row): best score minus second best; how far the top-1 prediction is from a tie (inf: one item)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] < 2:
        return np.full(scores.shape[0], np.inf)
    best_two = -np.partition(-scores, 1, axis=1)[:, :2]
    return best_two[:, 0] - best_two[:, 1]


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions where two prediction lists agree."""
    first, second = _pair(a, b)
    return float(np.mean(first == second))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two equally shaped embedding matrices."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"embeddings of shapes {a.shape} and {b.shape} cannot be compared row by row")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)


def _pair(a: Sequence[int], b: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(a), np.asarray(b)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"need two 1-D label lists of the same length, got shapes {first.shape} and {second.shape}")
    if first.size == 0:
        raise ValueError("no labels: the metric is undefined")
    return first, second
