"""PMEB metrics against values worked out by hand on small cases (ties, imbalance, classes only predicted)."""

from __future__ import annotations

import numpy as np
import pytest

from pue.benchmarks.pmeb import metrics

# 4 queries × 4 gallery items, query q's correct item is q. Ties count against the correct item:
# q0: item 1 ties the correct 0.9            → rank 2
# q1: items 2 and 3 tie the correct 0.5      → rank 3
# q2: the correct 0.8 is strictly the best   → rank 1
# q3: everything ties                        → rank 4 (a constant model gets no credit)
SIMILARITY = np.array(
    [
        [0.9, 0.9, 0.1, 0.0],
        [0.2, 0.5, 0.5, 0.5],
        [0.1, 0.2, 0.8, 0.3],
        [0.4, 0.4, 0.4, 0.4],
    ]
)
IDENTITY = [[0], [1], [2], [3]]


def test_ranks_break_ties_against_the_correct_item():
    assert metrics.retrieval_ranks(SIMILARITY, IDENTITY).tolist() == [2, 3, 1, 4]


def test_recall_at_k_on_4x4_with_ties():
    assert metrics.recall_at_k(SIMILARITY, IDENTITY, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    assert metrics.recall_at_k(SIMILARITY, IDENTITY) == {1: 0.25, 5: 1.0, 10: 1.0}


def test_ranks_do_not_depend_on_gallery_order():
    order = [3, 1, 0, 2]
    moved = [[order.index(q)] for q in range(4)]
    assert metrics.retrieval_ranks(SIMILARITY[:, order], moved).tolist() == [2, 3, 1, 4]


def test_several_correct_items():
    # Correct items tied with each other do not push each other down; the best correct item counts.
    similarity = np.array([[0.3, 0.7, 0.7, 0.1], [0.5, 0.6, 0.2, 0.5]])
    assert metrics.retrieval_ranks(similarity, [[1, 2], [0, 3]]).tolist() == [1, 2]
    assert metrics.recall_at_k(similarity, [[1, 2], [0, 3]], ks=(1, 2)) == {1: 0.5, 2: 1.0}


def test_top1_takes_the_lowest_index_among_ties():
    assert metrics.top1(SIMILARITY).tolist() == [0, 1, 2, 0]


def test_bad_retrieval_input():
    with pytest.raises(ValueError, match="no correct item"):
        metrics.retrieval_ranks(SIMILARITY, [[0], [], [2], [3]])
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_ranks(np.array([[np.nan, 0.0]]), [[0]])
    with pytest.raises(ValueError, match="3 lists"):
        metrics.retrieval_ranks(SIMILARITY, IDENTITY[:3])


# 10 samples, imbalanced: class 0 ×6, class 1 ×3, class 2 ×1.
TRUE = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2]
PRED = [0, 0, 0, 0, 0, 1, 1, 0, 1, 0]


def test_accuracy_and_balanced_accuracy_on_imbalanced_labels():
    assert metrics.accuracy(TRUE, PRED) == pytest.approx(0.7)  # 5 + 2 + 0 right of 10
    # recalls 5/6, 2/3, 0/1 → mean 0.5, far below the accuracy the majority class props up
    assert metrics.balanced_accuracy(TRUE, PRED) == pytest.approx(0.5)


def test_weighted_f1():
    # class 0: tp 5, support 6, predicted 7 → F1 = 2·5 / (6 + 7) = 10/13
    # class 1: tp 2, support 3, predicted 3 → F1 = 4/6
    # class 2: tp 0                          → F1 = 0
    # weighted by support: (6·10/13 + 3·4/6 + 1·0) / 10
    assert metrics.weighted_f1(TRUE, PRED) == pytest.approx((6 * 10 / 13 + 3 * 4 / 6) / 10)


def test_classes_only_predicted():
    # Class 2 never occurs: it lowers class 0's recall and precision but has no weight of its own.
    true, pred = [0, 0, 1], [0, 2, 1]
    assert metrics.balanced_accuracy(true, pred) == pytest.approx((1 / 2 + 1) / 2)
    assert metrics.weighted_f1(true, pred) == pytest.approx((2 * (2 / 3) + 1 * 1) / 3)


def test_perfect_and_empty():
    assert metrics.weighted_f1([1, 0, 1], [1, 0, 1]) == 1.0
    assert metrics.balanced_accuracy([1, 0, 1], [1, 0, 1]) == 1.0
    with pytest.raises(ValueError, match="no labels"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="same length"):
        metrics.accuracy([0, 1], [0])


def test_agreement_and_cosine():
    assert metrics.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert metrics.cosine_rows(a, b) == pytest.approx([np.sqrt(0.5), 1.0])


def test_top2_margin_by_hand():
    scores = np.array([[0.9, 0.5, 0.7], [0.2, 0.2, 0.1], [0.3, 0.8, -1.0]])
    assert np.allclose(metrics.top2_margin(scores), [0.2, 0.0, 0.5])
    assert np.isinf(metrics.top2_margin(np.array([[0.4], [0.1]]))).all()


def test_disagreements_are_reported_with_the_reference_margins():
    from pue.benchmarks.pmeb.evaluate import TaskResult, disagreement_margins

    reference = TaskResult(
        "t",
        "classification",
        {},
        {"class": np.array([0, 1, 1, 0])},
        {},
        margins={"class": np.array([0.3, 0.01, 0.2, 0.1])},
    )
    backend = TaskResult("t", "classification", {}, {"class": np.array([0, 0, 1, 1])}, {})
    out = disagreement_margins(backend, reference)["class"]
    assert out["disagreements"] == 2
    assert out["reference_margin_max_disagreeing"] == pytest.approx(0.1)  # items 1 (0.01) and 3 (0.1) flipped
    assert out["reference_margin_median"] == pytest.approx(0.15)
    same = disagreement_margins(reference, reference)["class"]
    assert same["disagreements"] == 0 and same["reference_margin_max_disagreeing"] is None
