"""SmoothQuant-style migration on small graphs: the FP32 function is unchanged, the activations are flatter, and the
scale is the documented absmax_x^α / absmax_w^(1-α) folded into the norm's gain (or an inserted Mul)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import helper
from onnx_graphs import float_input, initializer, make_model, run

from pue.calibration.graph_ops import weight_ops
from pue.calibration.smoothing import ALPHAS, smooth_model
from pue.calibration.stats import collect_channel_stats

CHANNELS = 8
OUTLIERS = {2: 60.0, 5: -40.0}  # channel → how much larger than the others it runs (LLM residual-stream style)


def activations(seed: int, rows: int = 48) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, CHANNELS)).astype(np.float32)
    for channel, factor in OUTLIERS.items():
        x[:, channel] *= factor
    return x


def norm_then_two_matmuls(extra_consumer: bool = False):
    """x · gain (an RMSNorm's weight) → q and k projections; optionally a residual Add that also reads the norm."""
    rng = np.random.default_rng(1)
    weights = {
        "gain": rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32),
        "w_q": rng.normal(size=(CHANNELS, 4)).astype(np.float32),
        "w_k": rng.normal(size=(CHANNELS, 6)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["normed"], name="norm"),
        helper.make_node("MatMul", ["normed", "w_q"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["normed", "w_k"], ["k"], name="mm_k"),
    ]
    outputs = ["q", "k"]
    if extra_consumer:
        nodes.append(helper.make_node("Add", ["normed", "x"], ["residual"], name="residual"))
        outputs.append("residual")
    return make_model(nodes, [float_input("x", ["rows", CHANNELS])], outputs, weights), outputs


def calibrate(model):
    ops = weight_ops(model, "decoder")
    feeds = [{"x": activations(seed)} for seed in range(4)]
    return ops, collect_channel_stats(model, ops, feeds, seed=0)


def max_relative_error(model, smoothed, outputs) -> float:
    feed = {"x": activations(seed=99, rows=32)}  # rows the calibration never saw
    errors = []
    for before, after in zip(run(model, feed, outputs), run(smoothed, feed, outputs), strict=True):
        errors.append(float(np.abs(after - before).max() / np.abs(before).max()))
    return max(errors)


@pytest.mark.parametrize("scheme", ["u8", "s8"])
def test_folded_into_the_norm_gain_leaves_the_function_unchanged(scheme):
    model, outputs = norm_then_two_matmuls()
    ops, stats = calibrate(model)
    assert stats["normed"].outlier_ratio() > 8.0  # the default threshold: this group is smoothed
    smoothed = copy.deepcopy(model)
    new_ops, new_stats, done = smooth_model(smoothed, ops, stats, scheme)

    assert len(done) == 1
    group = done[0]
    assert group.folded_into == "norm" and group.activation == "normed" and sorted(group.nodes) == ["mm_k", "mm_q"]
    assert group.alpha in ALPHAS and group.sqnr_after_db > group.sqnr_before_db
    assert [n.op_type for n in smoothed.graph.node] == ["Mul", "MatMul", "MatMul"]  # nothing inserted
    assert max_relative_error(model, smoothed, outputs) <= 1e-5

    # the scale, by hand: per input channel j, absmax_x[j]^α / max over both weights of max_n |W[j, n]|^(1-α)
    gain, w_q, w_k = (initializer(model, n) for n in ("gain", "w_q", "w_k"))
    absmax_x = np.abs(np.concatenate([activations(s) for s in range(4)]) * gain).max(axis=0)
    absmax_w = np.maximum(np.abs(w_q).max(axis=1), np.abs(w_k).max(axis=1))
    scale = absmax_x**group.alpha / absmax_w ** (1 - group.alpha)
    np.testing.assert_allclose(initializer(smoothed, "gain"), gain / scale, rtol=1e-5)
    np.testing.assert_allclose(initializer(smoothed, "w_q"), w_q * scale[:, None], rtol=1e-5)
    np.testing.assert_allclose(initializer(smoothed, "w_k"), w_k * scale[:, None], rtol=1e-5)

    # the smoothed activations are flatter, measured on the smoothed graph itself, and the returned stats say so
    measured = collect_channel_stats(smoothed, new_ops, [{"x": activations(seed)} for seed in range(4)])["normed"]
    np.testing.assert_allclose(new_stats["normed"].absmax, measured.absmax, rtol=1e-5)
    absmax_before, absmax_after = stats["normed"].absmax, measured.absmax
    assert absmax_after.max() / absmax_after.min() < (absmax_before.max() / absmax_before.min()) / 4
    assert measured.outlier_ratio() == pytest.approx(group.outlier_ratio_after, rel=1e-5)
    assert group.outlier_ratio_after < group.outlier_ratio_before / 4
    assert all(op.activation == "normed" for op in new_ops)


def test_norm_with_another_consumer_gets_an_inserted_mul():
    """Folding 1/s into the gain would change what the residual Add reads, so a Mul goes in front of the group."""
    model, outputs = norm_then_two_matmuls(extra_consumer=True)
    ops, stats = calibrate(model)
    smoothed = copy.deepcopy(model)
    new_ops, new_stats, done = smooth_model(smoothed, ops, stats, "u8")

    assert len(done) == 1 and done[0].folded_into is None and done[0].activation == "normed_smoothed"
    np.testing.assert_array_equal(initializer(smoothed, "gain"), initializer(model, "gain"))
    inserted = [n for n in smoothed.graph.node if n.name == "pue_smooth_normed"]
    assert len(inserted) == 1 and list(inserted[0].input) == ["normed", "pue_smooth_inv_normed"]
    readers = {n.name: list(n.input) for n in smoothed.graph.node}
    assert readers["mm_q"][0] == readers["mm_k"][0] == "normed_smoothed" and readers["residual"][0] == "normed"
    assert {op.activation for op in new_ops} == {"normed_smoothed"} and "normed_smoothed" in new_stats
    assert max_relative_error(model, smoothed, outputs) <= 1e-5


def test_graph_input_gets_an_inserted_mul():
    rng = np.random.default_rng(2)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [float_input("x", ["rows", CHANNELS])],
        ["y"],
        {"w": rng.normal(size=(CHANNELS, 5)).astype(np.float32)},
    )
    ops, stats = calibrate(model)
    smoothed = copy.deepcopy(model)
    _, _, done = smooth_model(smoothed, ops, stats, "u8")
    assert len(done) == 1 and done[0].folded_into is None
    assert [n.op_type for n in smoothed.graph.node] == ["Mul", "MatMul"]
    assert max_relative_error(model, smoothed, ["y"]) <= 1e-5


def test_no_outliers_no_change():
    model, _ = norm_then_two_matmuls()
    ops = weight_ops(model, "decoder")
    flat = [{"x": np.random.default_rng(seed).normal(size=(48, CHANNELS)).astype(np.float32)} for seed in range(4)]
    stats = collect_channel_stats(model, ops, flat)
    assert stats["normed"].outlier_ratio() < 8.0
    smoothed = copy.deepcopy(model)
    new_ops, new_stats, done = smooth_model(smoothed, ops, stats, "u8")
    assert done == [] and new_ops == ops and new_stats.keys() == stats.keys()
    assert smoothed.SerializeToString() == model.SerializeToString()
