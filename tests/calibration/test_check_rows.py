"""The parent's rows of the calibration check items come from the statistics pass (the decoder's run on each
calibration row ends in its embedding), checked against the parent's own; the decoder's feeds take a patch's vision
outputs from the vision statistics pass instead of running the vision graph again."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx
import pytest

from pue.calibration import check_rows as check_rows_module
from pue.calibration.check_items import check_gate_set, check_row_keys
from pue.calibration.check_rows import CheckRows
from pue.calibration.graph_ops import weight_ops
from pue.calibration.readers import DecoderFeeds, VisionFeeds, VisionOutputs, default_captions, make_plan
from pue.calibration.sampling import sample_patches
from pue.calibration.sources import open_sources
from pue.calibration.stats import collect_channel_stats
from pue.runtime import Embedder


@pytest.fixture(scope="module")
def parent_and_plan(fp32_bundle):
    bundle = fp32_bundle("llava_next", "ci")
    with Embedder.load(bundle) as parent:
        patches, _ = sample_patches(open_sources(None, patch_size=parent.manifest.tile_size), 4)
        plan = make_plan(patches, default_captions(3))
        models = {name: onnx.load(str(bundle / f"{name}.onnx")) for name in ("vision", "decoder")}
        yield parent, plan, models


def _statistics_pass(parent, plan, models, memo, observe_decoder):
    """The two graphs' statistics passes as `prepare_graphs` runs them: the vision pass keeps its outputs in `memo`
    (where given), the decoder's feeds read them, and `observe_decoder` sees the decoder's rows."""
    vision = VisionFeeds(parent, plan.patches)
    observe = None if memo is None else partial(memo.observe, vision)
    collect_channel_stats(models["vision"], weight_ops(models["vision"], "vision"), vision, observe=observe)
    decoder = DecoderFeeds(parent, plan, vision=memo)
    ops = weight_ops(models["decoder"], "decoder")
    collect_channel_stats(models["decoder"], ops, decoder, observe=partial(observe_decoder, decoder))


def test_the_check_rows_come_from_the_statistics_pass_and_agree_with_the_parents(parent_and_plan):
    parent, plan, models = parent_and_plan
    items = check_gate_set(plan)
    assert len(items.image_sets) == 1 and len(items.composed_texts) == 1  # every kind of row is covered
    embedded = []
    rows = CheckRows(
        items, check_row_keys(plan), lambda subset: embedded.append(subset) or subset.embed(parent), parent
    )
    memo = VisionOutputs()
    runs = parent.backend.vision.inference_count
    _statistics_pass(parent, plan, models, memo, rows.observe)
    # the decoder's one-patch rows (4 images, 1 composed) took the vision pass's outputs; the set of 2 ran its own
    assert memo.hits == 5 and parent.backend.vision.inference_count == runs + 1
    got, own = rows.rows(), items.embed(parent)
    assert list(got) == list(own) == ["images", "texts", "composed", "image_sets"]
    for kind in own:
        assert got[kind].shape == own[kind].shape
        assert np.sum(got[kind] * own[kind], axis=1).min() >= 0.99999
    assert not embedded  # nothing embedded again
    assert rows.record["from_statistics_pass"] == items.item_count() and rows.record["embedded"] == 0
    agreement = rows.record["agreement"]  # two patches and two texts against the parent's own rows
    assert agreement["min_cosine"] >= 0.99999 and agreement["count"] == 4
    assert rows.rows() is got  # completed once


def test_rows_the_pass_did_not_embed_are_embedded_in_their_places(parent_and_plan):
    parent, plan, models = parent_and_plan
    items = check_gate_set(plan)
    rows = CheckRows(items, check_row_keys(plan), lambda subset: subset.embed(parent), parent)
    def every_other(feeds, index, outputs):  # the pass shows only some rows
        if index % 2 == 0:
            rows.observe(feeds, index, outputs)

    _statistics_pass(parent, plan, models, None, every_other)
    got, own = rows.rows(), items.embed(parent)
    taken = rows.record["from_statistics_pass"]
    assert 0 < taken < items.item_count() and taken + rows.record["embedded"] == items.item_count()
    for kind in own:
        assert np.sum(got[kind] * own[kind], axis=1).min() >= 0.99999


def test_rows_that_do_not_agree_with_the_parents_are_not_taken(parent_and_plan, monkeypatch):
    parent, plan, models = parent_and_plan
    items = check_gate_set(plan)
    monkeypatch.setattr(check_rows_module, "REFERENCE_MIN_COSINE", 1.5)  # no agreement is good enough
    rows = CheckRows(items, check_row_keys(plan), lambda subset: subset.embed(parent), parent)
    _statistics_pass(parent, plan, models, None, rows.observe)
    got, own = rows.rows(), items.embed(parent)
    assert all(np.array_equal(got[kind], own[kind]) for kind in own)  # every row the reference's
    assert rows.record["from_statistics_pass"] == 0 and rows.record["embedded"] == items.item_count()
    assert rows.record["agreement"]["min_cosine"] < 1.5


def test_image_sets_a_bundle_does_not_take_are_neither_kept_nor_measured(parent_and_plan):
    parent, plan, models = parent_and_plan

    class OneImagePerRow:  # the parent as a bundle that takes one image per row sees it
        def __init__(self, embedder):
            self.embedder, self.takes_image_sets = embedder, False

        def __getattr__(self, name):
            return getattr(self.embedder, name)

    items = check_gate_set(plan)
    single = OneImagePerRow(parent)
    rows = CheckRows(items, check_row_keys(plan), lambda subset: subset.embed(single), single)
    _statistics_pass(parent, plan, models, None, rows.observe)
    got = rows.rows()
    assert list(got) == list(items.embed(single)) == ["images", "texts", "composed"]
    assert rows.record["from_statistics_pass"] == items.item_count() - 1 and rows.record["embedded"] == 0


def test_vision_outputs_are_kept_within_their_limit_and_copied():
    memo = VisionOutputs(limit_bytes=64)

    class Feeds:
        patches = ["a", "b", "c"]

    first = {"image_features": np.ones((2, 4), np.float32)}  # 32 bytes
    memo.observe(Feeds, 0, first)
    memo.observe(Feeds, 1, {"image_features": np.zeros((2, 4), np.float32)})
    memo.observe(Feeds, 2, {"image_features": np.zeros((2, 4), np.float32)})  # over the limit: not kept
    first["image_features"][:] = 7  # the caller's array: the memo keeps its own copy
    assert memo.get("c") is None and memo.bytes == 64 and memo.hits == 0
    assert np.array_equal(memo.get("a")["image_features"], np.ones((2, 4), np.float32)) and memo.hits == 1
