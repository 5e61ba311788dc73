"""pue.fidelity: the gates' measurements computed by hand, the report, the failure file and the printer."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from pue.errors import GateFailedError, PueError
from pue.fidelity import (
    FIDELITY,
    PARITY,
    Check,
    FidelityThresholds,
    GateReport,
    compare_for_parity,
    cosine_rows,
    fail_gate,
    gate_failure_path,
    mean_pairwise_cosine,
    measure_fidelity,
    nearest_parent_gap,
    print_gate,
    retrieval_agreement,
)
from pue.gate_set import GateSet, image_sets_of


def test_measure_fidelity_by_hand():
    parent = {"images": np.eye(4, dtype=np.float32)}
    same = measure_fidelity({"images": np.eye(4, dtype=np.float32)}, parent)
    assert same.kind == FIDELITY and same.passed
    assert same.overall["top1"] == 1.0 and same.overall["min_cosine"] == pytest.approx(1.0)
    swapped = np.eye(4, dtype=np.float32)[[1, 0, 2, 3]]
    report = measure_fidelity({"images": swapped}, parent, FidelityThresholds())
    assert report.overall["top1"] == 0.5
    assert report.overall["mean_cosine"] == pytest.approx(0.5)
    assert report.overall["min_cosine"] == pytest.approx(0.0)
    assert not report.passed and len(report.failures()) == 3
    assert [c.metric for c in report.checks] == ["mean cosine", "min cosine", "top-1 self-retrieval"]
    # ties count in the item's favour
    assert retrieval_agreement(np.ones((3, 2)), np.ones((3, 2)), 1) == 1.0


def test_self_retrieval_is_within_each_kind():
    images = np.eye(3)
    texts = np.eye(3)  # identical to the images: across kinds they would tie, within kinds each finds itself
    report = measure_fidelity({"images": images, "texts": texts}, {"images": images, "texts": texts})
    assert report.per_kind["images"]["top1"] == 1.0 and report.per_kind["texts"]["count"] == 3


def test_top1_counts_swaps_between_items_the_parent_tells_apart():
    """Items 0 and 1 are near-duplicates in the parent (1 − cos 0.001, under the 0.005 of error the mean threshold
    allows an item); the candidate moves item 0 a little toward item 1 (a swap no bundle within the thresholds can be
    held to) and, in the second case, item 2 onto item 3 (far apart: a real miss). The first is reported and not
    counted; the second fails top-1. `top1_strict` counts both."""
    angle = np.arccos(0.999)
    parent = np.array([[1.0, 0.0, 0.0, 0.0], [np.cos(angle), np.sin(angle), 0.0, 0.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    candidate = parent.copy()
    candidate[0] = [np.cos(0.6 * angle), np.sin(0.6 * angle), 0.0, 0.0]  # nearer item 1's parent than its own
    assert nearest_parent_gap(parent) == pytest.approx(0.001)
    report = measure_fidelity({"images": candidate[:2]}, {"images": parent[:2]})
    (miss,) = report.extra["top1_misses"]
    assert (miss["item"], miss["taken"], miss["near_duplicate"]) == (0, 1, True)
    assert miss["parent_gap"] == pytest.approx(0.001) and miss["error"] == pytest.approx(1 - np.cos(0.6 * angle))
    assert report.per_kind["images"]["parent_nearest_gap"] == pytest.approx(0.001)
    assert report.passed and report.overall["top1"] == 1.0 and report.overall["top1_strict"] == 0.5
    top1 = next(c for c in report.checks if c.metric == "top-1 self-retrieval")
    assert "1 swap(s) between near-duplicates" in top1.note and "not counted" in top1.note
    # a stricter mean threshold resolves finer pairs: at 0.9995 the same swap (0.001 apart) is a miss
    strict = measure_fidelity({"images": candidate[:2]}, {"images": parent[:2]}, FidelityThresholds(0.9995, 0.98))
    assert not strict.passed and strict.overall["top1"] == 0.5 and "1 missed" in strict.failures()[0]
    far = candidate.copy()
    far[2] = parent[3]
    wide = measure_fidelity({"images": far}, {"images": parent})
    assert sorted(m["item"] for m in wide.extra["top1_misses"]) == [0, 2]
    assert wide.overall["top1"] == 0.75 and wide.overall["top1_strict"] == 0.5 and not wide.passed
    failure = next(f for f in wide.failures() if "top-1" in f)  # the min cosine fails too (item 2: 0)
    assert "1 missed" in failure and "1 swap(s) between near-duplicates" in failure
    assert "top1_misses" in wide.to_dict()
    out = io.StringIO()
    from rich.console import Console

    print_gate(Console(file=out, width=200), wide.to_dict())
    printed = out.getvalue()
    assert "top-1 took #3" in printed and "top-1 took #1 (near-duplicate)" in printed
    assert "top-1, near-duplicate swaps counted" in printed
    assert "top1_misses" not in measure_fidelity({"images": parent}, {"images": parent}).to_dict()


def test_cosine_and_pairwise_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 1.0], [2.0, 2.0]])
    assert cosine_rows(a, b) == pytest.approx([np.sqrt(0.5), 1.0])
    assert mean_pairwise_cosine(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)
    assert mean_pairwise_cosine(np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])) == pytest.approx(1.0)


def test_thresholds_overrides_keep_one_copy_of_the_defaults():
    assert FidelityThresholds.with_overrides() == FidelityThresholds()
    assert FidelityThresholds.with_overrides(min_cosine=0.9) == FidelityThresholds(0.995, 0.9, 0.98)


def test_the_int8_searchs_check_asks_a_minimum_half_way_to_one():
    assert FidelityThresholds().for_check() == FidelityThresholds(0.995, 0.99, 0.98)
    assert FidelityThresholds.with_overrides(min_cosine=0.9).for_check().min_cosine == pytest.approx(0.95)


def test_parity_checks_and_a_nan_never_passes():
    report = GateReport(PARITY, "bundle vs reference")
    want = np.array([[1.0, 0.0], [0.0, 1.0]])
    compare_for_parity(report, "images", want + 1e-6, want, 0.9999, 1e-4)
    assert report.passed and [c.metric for c in report.checks] == ["min cosine", "max abs diff"]
    compare_for_parity(report, "texts", np.zeros((3, 2)), want, 0.9999, 1e-4)  # wrong shape
    assert not report.passed and "texts shape" in report.failures()[0]
    assert not Check("x", "max abs diff", float("nan"), 1.0, higher_is_better=False).passed


def test_a_failed_gate_writes_its_measurements_and_raises(tmp_path):
    report = measure_fidelity({"images": np.eye(4)[[1, 0, 2, 3]]}, {"images": np.eye(4)})
    out = tmp_path / "int8"
    with pytest.raises(GateFailedError, match="fidelity gate FAILED: all items mean cosine") as raised:
        fail_gate(out, "fidelity gate", report, {"precision": "int8"})
    path = gate_failure_path(out)
    assert path == tmp_path / "int8.gate-failed.json" and raised.value.report_path == str(path)
    written = json.loads(path.read_text())
    assert written["precision"] == "int8" and written["gate"]["passed"] is False
    assert written["gate"]["overall"]["top1"] == 0.5 and not out.exists()
    assert raised.value.exit_code == 3
    assert not list(tmp_path.glob("*.partial"))


def test_gate_set_from_a_folder(tmp_path):
    for name in ("b.png", "a.jpg", "c.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    gate_set = GateSet.default(tmp_path, minimum=3)
    assert [p.name for p in gate_set.images] == ["a.jpg", "b.png", "c.tif"]
    assert len(gate_set.composed_images) == len(gate_set.composed_texts) == 3
    with pytest.raises(Exception, match="at least 4 held-out images"):
        GateSet.default(tmp_path)


def test_printer_prints_names_literally():
    from rich.console import Console

    report = GateReport(PARITY, "x", checks=[Check("[/INST] images", "min cosine", 0.5, 0.9)])
    buffer = io.StringIO()
    print_gate(Console(file=buffer, width=200, markup=False), report.to_dict(), title="gate [bold]x")
    text = buffer.getvalue()
    assert "[/INST] images" in text and "gate [bold]x" in text and text.rstrip().endswith("FAILED")


# --- several images per row (issue 16) ---------------------------------------------------------------------------


def test_image_sets_of_consecutive_images():
    images = list("abcdefghijklmn")
    assert image_sets_of(images) == [list("ab"), list("cdef"), list("gh"), list("ijkl")]
    assert image_sets_of(list("abcde")) == [list("ab")]  # the next set of 4 does not fit
    assert image_sets_of(list("a")) == []


class _Embedder:
    """Counts what a gate asks for; vectors are the item's index (one-hot)."""

    def __init__(self, takes_image_sets: bool, max_images_per_row: int = 4) -> None:
        self.takes_image_sets = takes_image_sets
        self.max_images_per_row = max_images_per_row
        self.sets: list[list[str]] = []

    def _vectors(self, count: int) -> np.ndarray:
        return np.eye(8, dtype=np.float32)[:count]

    def embed_images(self, images):
        return self._vectors(len(images))

    def embed_texts(self, texts):
        return self._vectors(len(texts))

    def embed_composed(self, images, texts):
        return self._vectors(len(images))

    def embed_image_sets(self, sets):
        self.sets = [list(s) for s in sets]
        return self._vectors(len(sets))


def test_gate_set_embeds_image_sets_only_where_the_bundle_takes_them():
    gate = GateSet(list("abcdef"), ["t"], ["a"], ["m"], image_sets_of(list("abcdef")))
    new, old = _Embedder(True), _Embedder(False)
    assert set(gate.embed(new)) == {"images", "texts", "composed", "image_sets"}
    assert new.sets == [list("ab"), list("cdef")]
    assert set(gate.embed(old)) == {"images", "texts", "composed"} and old.sets == []
    short = _Embedder(True, max_images_per_row=3)  # a 4-image row would pass its max_seq_len
    assert gate.embed(short)["image_sets"].shape[0] == 1 and short.sets == [list("ab")]
    assert set(gate.embed(_Embedder(True, max_images_per_row=1))) == {"images", "texts", "composed"}
    assert "2 image sets (2/4 images)" in gate.counts()
    assert gate.up_to_images(2).image_sets == [list("ab")] and gate.up_to_images(1).image_sets == []
    # a fidelity report covers every kind the parent embedded, image sets included
    report = measure_fidelity(gate.embed(new), gate.embed(new))
    assert report.per_kind["image_sets"]["count"] == 2


def test_select_takes_the_items_at_a_reports_indices():
    """Indices run over the measured order (images, texts, composed, image sets) as a report's `cosines` do; with
    image sets that did not fit a row left out of `rows`, an index counts the measured ones only."""
    gate = GateSet(list("abcdef"), ["t0", "t1"], ["a", "b"], ["m0", "m1"], image_sets_of(list("abcdef")))
    rows = gate.embed(_Embedder(True))  # 6 images, 2 texts, 2 composed, 2 sets: indices 0-11
    subset, picked = gate.select(rows, [1, 7, 9, 11])
    assert subset.images == ["b"] and subset.texts == ["t1"] and subset.composed_images == ["b"]
    assert subset.composed_texts == ["m1"] and subset.image_sets == [list("cdef")]
    assert {kind: len(r) for kind, r in picked.items()} == {"images": 1, "texts": 1, "composed": 1, "image_sets": 1}
    np.testing.assert_array_equal(picked["images"], rows["images"][[1]])
    # what the subset embeds lines up with the parent rows it was given
    report = measure_fidelity(subset.embed(_Embedder(True)), picked)
    assert report.overall["count"] == 4
    only_small = gate.embed(_Embedder(True, max_images_per_row=3))  # the 4-image set was not measured
    subset, picked = gate.select(only_small, [10])
    assert subset.image_sets == [list("ab")] and set(picked) == {"image_sets"}
    with pytest.raises(PueError, match=r"items \[12\] are not among the 12 measured ones"):
        gate.select(rows, [12])
