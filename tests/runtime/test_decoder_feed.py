"""`decoder_feed`: the one place where the decoder's inputs are built, per-image inputs beyond `image_features`
(Qwen3-VL's `deepstack_features`) placed per row the same way."""

from __future__ import annotations

import numpy as np

from pue.bundle import TensorSpec
from pue.runtime.backends.base import decoder_feed, feature_inputs

TOKENS, LEVELS, HIDDEN = 2, 3, 4
INPUTS = [
    TensorSpec("input_ids", "int64", ["batch", "sequence"]),
    TensorSpec("attention_mask", "int64", ["batch", "sequence"]),
    TensorSpec("image_features", "float32", ["batch", "image_tokens", HIDDEN]),
    TensorSpec("deepstack_features", "float32", ["batch", "image_tokens", LEVELS, HIDDEN]),
]


def test_the_per_image_inputs_are_every_input_but_ids_and_mask():
    assert [spec.name for spec in feature_inputs(INPUTS)] == ["image_features", "deepstack_features"]


def test_an_all_text_batch_gets_one_zero_image_token_of_each():
    ids = np.ones((3, 5), np.int64)
    feed = decoder_feed(INPUTS, ids, ids, None, np.zeros(0, np.int64), HIDDEN)
    assert feed["image_features"].shape == (3, 1, HIDDEN) and feed["deepstack_features"].shape == (3, 1, LEVELS, HIDDEN)
    assert not feed["image_features"].any() and not feed["deepstack_features"].any()


def test_every_per_image_input_is_placed_row_by_row_alike():
    """Rows: text, two images, one image. Row 1 holds images 0 and 1 one after another, row 2 image 2."""
    rng = np.random.default_rng(0)
    outputs = {
        "image_features": rng.standard_normal((3, TOKENS, HIDDEN)).astype(np.float32),
        "deepstack_features": rng.standard_normal((3, TOKENS, LEVELS, HIDDEN)).astype(np.float32),
    }
    ids = np.ones((3, 7), np.int64)
    feed = decoder_feed(INPUTS, ids, ids, outputs, np.array([1, 1, 2]), HIDDEN)
    for name, value in outputs.items():
        placed = feed[name]
        assert placed.shape == (3, 2 * TOKENS, *value.shape[2:])
        assert not placed[0].any()
        assert np.array_equal(placed[1], np.concatenate([value[0], value[1]]))
        assert np.array_equal(placed[2, :TOKENS], value[2]) and not placed[2, TOKENS:].any()
