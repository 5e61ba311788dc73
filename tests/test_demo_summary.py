"""The demo's PMEB column: agreement over pue's own prediction lists, each counted once, weighted by its items."""

from __future__ import annotations

import pytest

from pue.demo import item_agreement


def row(task, predictions, metric, queries, agreement):
    return {"task": task, "predictions": predictions, "metric": metric, "queries": queries,
            "prediction_agreement": agreement}


def test_item_agreement_by_hand():
    rows = [
        row("caption", "image_to_text", "image_to_text_recall@1", 40, 0.975),  # 1 of 40 flipped
        row("caption", "image_to_text", "image_to_text_recall@5", 40, 0.975),  # the same list again
        row("composed", "answer_to_query", "answer_to_query_recall@1", 4, 0.0),  # 4 of 4 flipped
        row("composed", "homie_answer_to_query", "homie_answer_to_query_recall@1", 88, 0.0),  # HOMIE's re-scoring
        row("stain", "class", "accuracy", 16, 1.0),
    ]
    assert item_agreement(rows) == pytest.approx((39 + 0 + 16) / (40 + 4 + 16))
    assert item_agreement([]) is None
