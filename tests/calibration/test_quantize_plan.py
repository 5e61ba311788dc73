"""Quantization's resource plan: peak memory from the graphs and options, passes, refusal when it cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from pue.calibration.graph_ops import WeightOp
from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle
from pue.calibration.resources import (
    GraphLoad,
    PhasePeaks,
    activation_bytes,
    attention_bytes,
    max_attempts,
    plan_quantize,
)
from pue.errors import PueError

MB = 1024**2


def op(name: str, activation: str, k: int, n: int) -> WeightOp:
    return WeightOp("decoder", name, "MatMul", activation, f"{name}.w", (k, n), 2 * k * n)


def test_activation_bytes_count_each_quantized_input_once():
    ops = [op("q", "norm1", 64, 64), op("k", "norm1", 64, 32), op("v", "norm1", 64, 32), op("down", "act", 192, 64)]
    assert activation_bytes(ops, tokens=10) == 4 * 10 * (64 + 192)


def test_attempts_follow_the_doubling_fallback():
    assert max_attempts(0) == 1
    assert max_attempts(1) == 2  # all int8, then 1 op in float
    assert max_attempts(63) == 7  # 1, 2, 4, 8, 16, 32 ops in float
    assert max_attempts(64) == 8
    # 3 variants before the fallback; with GPTQ the baseline's GPTQ twin, then each later one with both roundings
    assert max_attempts(63, variants=3) == 10
    assert max_attempts(63, variants=3, gptq=True) == 1 + 1 + 2 * (3 + 6)
    assert max_attempts(0, variants=2, gptq=True) == 6  # no fallback: int8-dynamic's per-token variants only


def test_attention_scores_grow_with_the_square_of_the_tokens():
    assert attention_bytes(heads=8, tokens=1000, layers=10) == 4 * 8 * 1000 * 1000 * 10
    assert attention_bytes(heads=6, tokens=577, layers=12, sequences=3) == 3 * attention_bytes(6, 577, 12)


def graphs(weights_mb: float, activations_mb: float, scores_mb: float = 1.0) -> dict[str, GraphLoad]:
    return {
        "vision": GraphLoad(int(weights_mb * MB), int(activations_mb * MB), int(scores_mb * MB), 4, 64),
        "decoder": GraphLoad(int(2 * weights_mb * MB), int(activations_mb * MB / 2), int(scores_mb * MB), 6, 112),
    }


def plan(
    precision="int8",
    calibrated=True,
    fallback=True,
    available=64 * 1024 * MB,
    batch_mb=100,
    ranked_ops=0,
    every_row_calibrates=True,
    **sizes,
):
    return plan_quantize(
        precision,
        graphs(**sizes),
        calibrated=calibrated,
        fallback=fallback,
        op_count=63,
        outlier_rows=8,
        gate_items=68,
        batch_attention_bytes=int(batch_mb * MB),
        available=available,
        ranked_ops=ranked_ops,
        every_row_calibrates=every_row_calibrates,
    )


def test_plan_grows_with_weights_activations_and_scores_and_refuses_past_free_memory():
    small = plan(weights_mb=10, activations_mb=5)
    assert small.fits
    assert plan(weights_mb=4000, activations_mb=5).peak_host_bytes > small.peak_host_bytes + 3 * 12_000 * MB
    assert plan(weights_mb=10, activations_mb=1000).peak_host_bytes > small.peak_host_bytes + 1000 * MB
    assert plan(weights_mb=10, activations_mb=5, scores_mb=600).peak_host_bytes > small.peak_host_bytes + 3_000 * MB
    assert small.passes == {
        "outlier report": 1,
        "statistics": 1,
        "calibration": 7,
        "calibration check": 7,
        "unseen check": 7,
        "held-out gate": 1,
        "rounding floor, if the gate fails": 1,
    }
    tight = plan(weights_mb=4000, activations_mb=500, available=8 * 1024 * MB)
    assert not tight.fits and "int8-dynamic" in tight.notes[-1]
    text = "\n".join(tight.lines())
    assert "fits this machine: NO" in text and "of 8.00 GB free" in text


def test_the_gate_batch_counts_when_rows_are_long():
    small = plan(weights_mb=10, activations_mb=5, batch_mb=10)
    large = plan(weights_mb=10, activations_mb=5, batch_mb=800)
    assert large.peak_host_bytes > small.peak_host_bytes + 5_000 * MB


def test_dynamic_and_no_fallback_plans_have_no_calibration_passes():
    dynamic = plan("int8-dynamic", calibrated=False, fallback=False, available=None, weights_mb=10, activations_mb=5)
    assert dynamic.fits and dynamic.passes == {
        "outlier report": 1,
        "statistics": 1,
        "calibration check": 1,
        "unseen check": 1,
        "held-out gate": 1,
        "rounding floor, if the gate fails": 1,
    }


def test_phase_peaks_see_what_a_phase_allocated():
    peaks = PhasePeaks()
    peaks.end("small")
    block = np.ones(200 * MB // 8)  # touched: resident
    peaks.end("large")
    del block
    peaks.end("after")
    assert peaks.peaks_mb["large"] >= peaks.peaks_mb["small"] + 150
    # the "after" phase starts with the block still resident (it is freed after the reset): within a page or two
    assert abs(peaks.overall_mb() - peaks.peaks_mb["large"]) <= 1.0


def test_quantize_refuses_a_plan_that_does_not_fit(fp32_bundle, heldout_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("pue.calibration.resources.available_memory_bytes", lambda: 64 * MB)
    out = tmp_path / "int8"
    with pytest.raises(PueError, match="resource plan does not fit") as caught:
        quantize_bundle(fp32_bundle("llava_next", "ci"), out, QuantizeOptions("int8", heldout=heldout_dir))
    assert "int8-dynamic" in str(caught.value)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


# The plan against the measured peaks of a whole run in its own process: tests/cli/test_quantize_cli.py.


def test_the_search_and_its_ranking_hold_copies_of_all_the_weights():
    """On a weight-bound model (the Qwen3-VL-2B-shaped bench preset: 1.4 GB of weights, 64 image tokens) the search's
    phases peaked at 3-3.5 copies of the weights over the resident ones, the fallback's ranking highest; the plan
    counts them (before, it planned 6.51 GB for a 9.1 GB peak)."""
    plain = plan(weights_mb=1000, activations_mb=5, batch_mb=10)
    ranked = plan(weights_mb=1000, activations_mb=5, batch_mb=10, ranked_ops=24)
    assert plain.peak_host_bytes > 1.15 * 5.5 * 3000 * MB  # 1000 + 2000 MB of weights: 2 resident, 3.5 searching
    assert ranked.peak_host_bytes > plain.peak_host_bytes + 3000 * MB  # one copy more while ranking
    assert ranked.passes["fallback ranking"] == 25 and "fallback ranking" not in plain.passes
    no_fallback = plan(fallback=False, weights_mb=1000, activations_mb=5, batch_mb=10, ranked_ops=24)
    assert "fallback ranking" not in no_fallback.passes and no_fallback.peak_host_bytes == plain.peak_host_bytes
    fp16 = plan("fp16", calibrated=False, weights_mb=1000, activations_mb=5, batch_mb=10, ranked_ops=24)
    assert fp16.peak_host_bytes < plain.peak_host_bytes  # no INT8 search


def test_with_pues_own_ranges_the_calibration_session_runs_one_row():
    """`--calibration-method minmax` (the default): onnxruntime's calibrator reads one row, so the longest rows'
    attention counts once (the statistics pass), not in a calibration session over every row (the `bench` preset:
    planned 18.76 GB, measured 5.8 GB after that calibration ran one row; 8.09 GB planned now)."""
    every = plan(weights_mb=10, activations_mb=5, scores_mb=600, batch_mb=10)
    one = plan(weights_mb=10, activations_mb=5, scores_mb=600, batch_mb=10, every_row_calibrates=False)
    assert one.peak_host_bytes < every.peak_host_bytes - 2_000 * MB
    assert one.passes == every.passes  # the passes over the rows are the same; one of them reads a row


def test_the_variants_retried_with_8_bit_weights_count_in_the_plan():
    """Where the search may take 8-bit weights, every variant before them (GPTQ's too) may be tried again with them."""
    from pue.calibration.quantize_bundle import QuantizeOptions
    from pue.calibration.quantize_plan import search_variants

    seven = search_variants(QuantizeOptions(precision="int8", target="onnxruntime", wide_weights=False))
    eight = search_variants(QuantizeOptions(precision="int8", target="onnxruntime"))
    assert seven > 0 and eight == seven + 1 + seven + 1  # the 8-bit step, the others again, GPTQ's again
    assert search_variants(QuantizeOptions(precision="int8", target="tensorrt")) == seven  # 8 bits already


def test_openvinos_run_time_int8_counts_no_per_token_variants():
    """`int8-dynamic --target openvino` quantizes per token at run time: the plan counts only the channel splits."""
    from pue.calibration.quantize_bundle import QuantizeOptions
    from pue.calibration.quantize_plan import search_variants

    onnxruntime = search_variants(QuantizeOptions(precision="int8-dynamic", target="onnxruntime", wide_weights=False))
    openvino = search_variants(QuantizeOptions(precision="int8-dynamic", target="openvino"))
    assert openvino == 2 and onnxruntime == openvino + 2  # the writers' and readers' splits; per token twice


def test_the_balance_stage_counts_its_measures_and_one_more_candidate():
    """`kind_balance`: the best as it is, each block, each op of the two largest blocks (simulated), then one real
    candidate; nothing where it cannot run."""
    from pue.calibration.graph_ops import WeightOp
    from pue.calibration.quantize_bundle import QuantizeOptions
    from pue.calibration.quantize_plan import balance_measures

    def op(node: str) -> WeightOp:
        return WeightOp("decoder", node, "MatMul", "x", "w", (4, 4), 32)

    ops = [op(f"/m/layers.{i}/{name}/MatMul") for i in range(3) for name in "qkvo"] + [op("/m/layers.2/up/MatMul")]
    ops.append(op("/projector/fc/MatMul"))
    options = QuantizeOptions("int8")
    assert balance_measures(ops, options) == 1 + 4 + (5 + 4)  # blocks layers.0-2 and /projector; layers.2 has 5
    assert balance_measures(ops, QuantizeOptions("int8", balance_budget=0)) == 0
    assert balance_measures(ops, QuantizeOptions("int8", rank_ops=0)) == 0
    base = dict(calibrated=True, op_count=63, outlier_rows=8, gate_items=68, batch_attention_bytes=MB, available=None)
    small = graphs(weights_mb=10, activations_mb=5)
    with_stage = plan_quantize("int8", small, fallback=True, balance_measures=10, **base)
    without = plan_quantize("int8", small, fallback=True, **base)
    assert with_stage.passes["kind balance"] == 10 and "kind balance" not in without.passes
    assert with_stage.passes["calibration check"] == without.passes["calibration check"] + 1
    no_fallback = plan_quantize("int8", small, fallback=False, balance_measures=10, **base)
    assert "kind balance" not in no_fallback.passes
