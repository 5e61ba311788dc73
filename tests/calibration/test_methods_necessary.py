"""Issue 14's acceptance, on the cheapest representative cell of the fidelity matrix (scripts/fidelity_matrix.py):
static INT8 of the `massive` fixture (Qwen2-style llava, seed 0) passes the gate with the search's methods
(smoothing folded into up_proj, the massive-token op kept in float within the 80 % rule) and fails it with them
switched off (everything int8, per tensor, MinMax). int8-dynamic's counterpart is
tests/calibration/test_quantize.py::test_massive_tokens_need_per_token_dynamic_int8. The same for `vit-highnorm`
(the fallback ranked end to end), `gains-few` (the amplified channels in float on both sides of the stream) and
`gains-all` (the same channels amplified in every block)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle
from pue.errors import GateFailedError

FAST = {"num_patches": 16, "num_captions": 8}
OFF = {
    "smooth": False,
    "fallback": False,
    "per_token": False,
    "error_ranges": False,
    "gptq": False,
    "split_channels": False,
    "wide_weights": False,
    "bias_correction": False,
}


def assert_the_quantizers_error(output: Path, failure: GateFailedError) -> None:
    """Nothing was written but the failure's report, and it says the fixture is not what failed: the parent passes
    the same gate in bf16 arithmetic (`pue.calibration.rounding_floor`), as a model trained in bf16 does."""
    assert not output.exists()
    failed = json.loads(Path(str(output) + ".gate-failed.json").read_text())
    assert failed["rounding_floor"]["passed"], failed["rounding_floor"]
    assert "the error is the quantizer's" in str(failure)


def test_massive_static_int8_passes_with_the_methods_and_fails_without(fp32_bundle, heldout_dir, tmp_path):
    parent = fp32_bundle("llava", "massive")
    options = QuantizeOptions(precision="int8", target="onnxruntime", heldout=heldout_dir, **FAST)
    result = quantize_bundle(parent, tmp_path / "on", options)
    assert result.fidelity.passed and result.int8_flop_share >= 0.8
    report = json.loads((tmp_path / "on" / "fidelity.json").read_text())
    balance = report["kind_balance"]  # what the balance stage kept float once the check passed
    balanced = set(balance["chosen"]) if balance and balance["taken"] else set()
    # the fallback's op reads the massive tokens
    assert set(report["float_nodes"]) - balanced == {"/language_model/layers.1/mlp/down_proj/MatMul"}
    assert [g["fold"] for g in report["smoothed"]] == ["up_proj"]
    off = QuantizeOptions(precision="int8", target="onnxruntime", heldout=heldout_dir, **FAST, **OFF)
    with pytest.raises(GateFailedError) as failure:
        quantize_bundle(parent, tmp_path / "off", off)
    assert_the_quantizers_error(tmp_path / "off", failure.value)


def test_vit_highnorm_static_int8_needs_the_measured_fallback(fp32_bundle, heldout_dir, tmp_path):
    """`vit-highnorm` (a ViT whose few high-norm tokens every later block attends to, as in trained CLIPs): static
    INT8 passes with the methods because the fallback, ranked end to end, keeps the fc2 that writes those tokens in
    float (the SQNR ranking scores it well: its error only shows downstream), and fails with them switched off."""
    parent = fp32_bundle("llava_next", "vit-highnorm")
    # The ranking measures the SQNR ranking's worst 12 ops (the default 24 costs 20 s more here): the fc2 it lifts
    # is ninth by SQNR, so the 12 still hold it and the test still shows the measured order beating SQNR's.
    # GPTQ's weights and the vision outputs' bias correction (both on by default) each change the candidate the
    # fallback starts from (with the correction it passes keeping the projector and the patch embedding float); this
    # test pins the ranking, so the weights here are rounded to nearest and the outputs left uncorrected.
    options = QuantizeOptions(
        precision="int8",
        target="onnxruntime",
        heldout=heldout_dir,
        rank_ops=12,
        gptq=False,
        bias_correction=False,
        **FAST,
    )
    result = quantize_bundle(parent, tmp_path / "on", options)
    assert result.fidelity.passed and result.int8_flop_share >= 0.8
    report = json.loads((tmp_path / "on" / "fidelity.json").read_text())
    assert any("/mlp/fc2/" in node for node in report["float_nodes"]), report["float_nodes"]
    assert report["measured_ranking"] and "/mlp/fc2/" in report["measured_ranking"][0]["node"]
    off = QuantizeOptions(precision="int8", target="onnxruntime", heldout=heldout_dir, **FAST, **OFF)
    with pytest.raises(GateFailedError) as failure:
        quantize_bundle(parent, tmp_path / "off", off)
    assert_the_quantizers_error(tmp_path / "off", failure.value)


def test_gains_few_static_int8_needs_the_amplified_channels_split(fp32_bundle, heldout_dir, tmp_path):
    """`gains-few` (LLaVA-NeXT: a few residual channels that later RMSNorm gains multiply by 100, conditioned like
    issue 13's real checkpoint): static INT8 passes with the methods, where the search takes the amplified channels
    in float on both sides of the stream (the writers' columns and the readers' rows), and fails with them off. The
    split alone is pinned here: 8-bit weights (tried last, while the check fails) are not tried."""
    parent = fp32_bundle("llava_next", "gains-few")
    options = QuantizeOptions(
        precision="int8", target="onnxruntime", heldout=heldout_dir, fallback=False, wide_weights=False, **FAST
    )
    result = quantize_bundle(parent, tmp_path / "on", options)
    assert result.fidelity.passed and result.int8_flop_share >= 0.8
    report = json.loads((tmp_path / "on" / "fidelity.json").read_text())
    assert report["channel_split"]["taken"] and report["channel_split"]["readers_taken"]
    off = QuantizeOptions(precision="int8", target="onnxruntime", heldout=heldout_dir, **FAST, **OFF)
    with pytest.raises(GateFailedError) as failure:
        quantize_bundle(parent, tmp_path / "off", off)
    assert_the_quantizers_error(tmp_path / "off", failure.value)


def test_gains_all_static_int8_passes_with_the_methods_and_fails_without(fp32_bundle, heldout_dir, tmp_path):
    """`gains-all` (LLaVA: the three amplified channels in every block): static INT8 passes with the methods (the
    search smooths every block's readers and splits the amplified channels) and fails without them (session 22:
    gate min 0.65, top-1 0.68 on the shipped gate), while the parent passes in bf16 arithmetic."""
    parent = fp32_bundle("llava", "gains-all")
    options = QuantizeOptions(precision="int8", target="onnxruntime", heldout=heldout_dir, **FAST)
    result = quantize_bundle(parent, tmp_path / "on", options)
    assert result.fidelity.passed and result.int8_flop_share >= 0.8
    report = json.loads((tmp_path / "on" / "fidelity.json").read_text())
    assert report["smoothed"], "no group smoothed"
    off = QuantizeOptions(precision="int8", target="onnxruntime", heldout=heldout_dir, **FAST, **OFF)
    with pytest.raises(GateFailedError) as failure:
        quantize_bundle(parent, tmp_path / "off", off)
    assert_the_quantizers_error(tmp_path / "off", failure.value)
