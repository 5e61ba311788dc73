"""Activation statistics against numpy on known inputs: per-channel min/max/absmax, the outlier ratio, the token
sample kept for sensitivity, Conv's channel axis, and every tensor's max |value| for FP16."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx_graphs import float_input, make_model

from pue.calibration.graph_ops import weight_ops
from pue.calibration.stats import (
    SENSITIVITY_SAMPLES,
    TOKENS_PER_SAMPLE,
    ChannelStats,
    collect_channel_stats,
    collect_tensor_absmax,
)


def test_absmax_and_outlier_ratio_by_hand():
    stats = ChannelStats(np.array([-3.0, -0.5, -1.0, 0.0]), np.array([1.0, 2.0, 0.5, 40.0]))
    np.testing.assert_array_equal(stats.absmax, [3.0, 2.0, 1.0, 40.0])
    assert stats.outlier_ratio() == pytest.approx(40.0 / 2.5)  # max over the median of [1, 2, 3, 40]
    assert ChannelStats(np.zeros(3), np.zeros(3)).outlier_ratio() == 0.0  # no division by zero


def gain_then_matmul():
    """x · gain → MatMul: the MatMul's activation is x · gain, with 3 channels."""
    gain = np.array([1.0, -2.0, 0.5], np.float32)
    model = make_model(
        [
            helper.make_node("Mul", ["x", "gain"], ["scaled"], name="norm"),
            helper.make_node("MatMul", ["scaled", "w"], ["y"], name="mm"),
        ],
        [float_input("x", ["batch", "tokens", 3])],
        ["y"],
        {"gain": gain, "w": np.ones((3, 2), np.float32)},
    )
    return model, gain


def test_channel_stats_match_numpy():
    model, gain = gain_then_matmul()
    ops = weight_ops(model, "decoder")
    assert [(op.node, op.activation) for op in ops] == [("mm", "scaled")]
    rng = np.random.default_rng(0)
    spread = np.array([1.0, 3.0, 10.0], np.float32)
    xs = [rng.normal(size=(2, 5, 3)).astype(np.float32) * spread for _ in range(SENSITIVITY_SAMPLES + 2)]
    stats = collect_channel_stats(model, ops, ({"x": x} for x in xs))  # a generator: streamed, read once

    rows = np.concatenate([(x * gain).reshape(-1, 3) for x in xs])
    channel = stats["scaled"]
    np.testing.assert_allclose(channel.minimum, rows.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(channel.maximum, rows.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(channel.absmax, np.abs(rows).max(axis=0), rtol=1e-6)
    # the sensitivity sample: the first SENSITIVITY_SAMPLES feeds, all of their 10 rows (fewer than TOKENS_PER_SAMPLE)
    assert len(channel.samples) == SENSITIVITY_SAMPLES and 10 < TOKENS_PER_SAMPLE
    for x, sample in zip(xs, channel.samples, strict=False):
        np.testing.assert_allclose(sample, (x * gain).reshape(-1, 3), rtol=1e-6)


def test_long_feeds_keep_a_seeded_sorted_subset_of_rows():
    model, gain = gain_then_matmul()
    ops = weight_ops(model, "decoder")
    tokens = TOKENS_PER_SAMPLE + 44
    x = np.arange(tokens * 3, dtype=np.float32).reshape(1, tokens, 3)
    first = collect_channel_stats(model, ops, [{"x": x}], seed=3)["scaled"].samples[0]
    again = collect_channel_stats(model, ops, [{"x": x}], seed=3)["scaled"].samples[0]
    other = collect_channel_stats(model, ops, [{"x": x}], seed=4)["scaled"].samples[0]
    assert first.shape == (TOKENS_PER_SAMPLE, 3)
    rows = (x * gain).reshape(-1, 3)
    index = np.round(first[:, 0] / 3).astype(int)  # column 0 of row i is 3·i
    assert (np.diff(index) > 0).all()  # distinct rows, in token order
    np.testing.assert_allclose(first, rows[index])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_conv_channels_are_axis_1():
    rng = np.random.default_rng(1)
    model = make_model(
        [helper.make_node("Conv", ["pixels", "kernel"], ["patches"], name="patch_embed", strides=[2, 2])],
        [float_input("pixels", ["batch", 3, 4, 4])],
        ["patches"],
        {"kernel": rng.normal(size=(5, 3, 2, 2)).astype(np.float32)},
    )
    ops = weight_ops(model, "vision")
    assert ops[0].in_channels == 3 and ops[0].flops_per_token == 2 * 5 * 3 * 2 * 2
    pixels = rng.normal(size=(2, 3, 4, 4)).astype(np.float32) * np.array([1.0, 5.0, 0.1], np.float32)[:, None, None]
    channel = collect_channel_stats(model, ops, [{"pixels": pixels}])["pixels"]
    np.testing.assert_allclose(channel.minimum, pixels.min(axis=(0, 2, 3)))
    np.testing.assert_allclose(channel.maximum, pixels.max(axis=(0, 2, 3)))
    assert channel.samples[0].shape == (2 * 4 * 4, 3)


def test_tensor_absmax_of_every_float_tensor():
    model = make_model(
        [
            helper.make_node("Mul", ["x", "big"], ["up"], name="scale_up"),
            helper.make_node("Sub", ["up", "shift"], ["down"], name="shift"),
            helper.make_node("Log", ["x"], ["log"], name="log"),  # log(0) = -inf
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),  # int64: not a float tensor
        ],
        [float_input("x", [2, 2])],
        ["down", "log", "shape"],
        {"big": np.array(1000.0, np.float32), "shift": np.array(30_000.0, np.float32)},
    )
    feeds = [
        {"x": np.array([[0.0, 2.0], [3.0, 4.0]], np.float32)},
        {"x": np.array([[1.0, 1.0], [1.0, 20.0]], np.float32)},
    ]
    absmax = collect_tensor_absmax(model, feeds, chunk=2)  # two sessions: both chunks are measured
    assert set(absmax) == {"up", "down", "log"}
    assert absmax["up"] == 20_000.0 and absmax["down"] == 30_000.0  # 0·1000 − 30,000 in the first feed
    assert absmax["log"] == float("inf")


def test_the_second_moment_is_the_token_samples_and_smoothing_divides_it():

    rng = np.random.default_rng(1)
    samples = [rng.normal(size=(30, 4)).astype(np.float32) for _ in range(3)]
    every = np.concatenate(samples)
    channel = ChannelStats(every.min(axis=0), every.max(axis=0), samples)
    np.testing.assert_allclose(channel.second_moment(), every.T @ every / len(every), rtol=1e-5)
    scale = np.array([2.0, 0.5, 4.0, 1.0], np.float32)
    divided = channel.scaled(scale)
    np.testing.assert_allclose(divided.second_moment(), (every / scale).T @ (every / scale) / len(every), rtol=1e-5)
    np.testing.assert_allclose(divided.maximum, every.max(axis=0) / scale, rtol=1e-6)
    assert ChannelStats(np.zeros(4), np.zeros(4)).second_moment() is None
