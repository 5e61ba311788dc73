"""The outlier report (issue 13): per quantizable activation, which channels and which token positions dominate;
by hand on a small graph, and on each trained-like fixture it finds what the fixture planted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper
from onnx_graphs import float_input, make_model

from pue.calibration.graph_ops import weight_ops
from pue.calibration.outliers import collect_outliers, summarize


def test_channels_and_positions_by_hand():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 4)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")
    model = make_model([node], [float_input("x", [1, "seq", 8])], ["y"], {"w": weight})
    feeds = []
    for _ in range(3):
        x = rng.uniform(0.5, 1.0, size=(1, 6, 8)).astype(np.float32)
        x[..., 5] *= 40.0  # a channel 40x the others, on every token
        x[0, 2] *= 3.0  # position 2 is the largest token of each sample
        feeds.append({"x": x})
    (report,) = collect_outliers(model, weight_ops(model, "decoder"), feeds, top=2)
    channel_absmax = np.max([np.abs(f["x"]).max(axis=(0, 1)) for f in feeds], axis=0)
    token_absmax = np.concatenate([np.abs(f["x"]).max(axis=2).reshape(-1) for f in feeds])
    assert report.readers == ["proj"] and report.channels == 8
    assert report.top_channels[0] == 5
    assert report.channel_ratio == pytest.approx(channel_absmax.max() / np.median(channel_absmax), rel=1e-6)
    assert report.token_ratio == pytest.approx(token_absmax.max() / np.median(token_absmax), rel=1e-6)
    assert report.top_positions[0] == 2
    summary = summarize([report], threshold=20)
    assert summary["channel_outlier_tensors"] == 1 and summary["token_outlier_tensors"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava_next", "llava", "qwen2_5_vl"])
def test_report_finds_the_planted_norm_gain_channels(outlier_report, tiny_checkpoint, arch):
    info = json.loads((tiny_checkpoint(arch, "gains-few") / "pue_tiny.json").read_text())["outliers"]
    report = outlier_report(arch, "gains-few")
    flagged = [t for t in report["decoder"] if t.channel_ratio >= 20]
    assert flagged  # the q/k/v and gate/up inputs after the gained norms
    assert all(set(t.top_channels) == set(info["channels"]) for t in flagged)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava_next", "llava", "qwen3_vl"])
def test_report_finds_the_massive_tokens(fp32_bundle, outlier_report, tiny_checkpoint, arch):
    from pue.runtime import Embedder

    info = json.loads((tiny_checkpoint(arch, "massive") / "pue_tiny.json").read_text())["outliers"]
    bundle = fp32_bundle(arch, "massive")
    report = outlier_report(arch, "massive")
    writer = max(report["decoder"], key=lambda t: t.token_ratio)
    assert writer.token_ratio >= 100 and writer.top_channels[0] == info["intermediate_unit"]
    assert f"layers.{info['layer']}/" in writer.readers[0] and "down_proj" in writer.readers[0]
    with Embedder.load(bundle) as embedder:
        image_prompt = embedder.prompts.image_prompt()
    # the leading positions are trigger tokens of the image prompt (BOS or Qwen's <|im_start|>, the ':' of the turn
    # markers)
    assert all(image_prompt[p] in info["trigger_token_ids"] for p in writer.top_positions if p < len(image_prompt))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava_next", "llava"])
def test_report_finds_the_high_norm_vision_tokens(outlier_report, tiny_checkpoint, arch):
    info = json.loads((tiny_checkpoint(arch, "vit-highnorm") / "pue_tiny.json").read_text())["outliers"]
    report = outlier_report(arch, "vit-highnorm")
    projector = [t for t in report["vision"] if any("projector" in r for r in t.readers)]
    first = projector[0]  # the projector's first linear reads the un-normalised vision layer
    offset = 1 if info["position_includes_cls"] else 0  # CLIP's CLS token is dropped before the projector
    assert first.token_ratio >= 20
    assert sorted(first.top_positions) == [p - offset for p in info["positions"]]


@pytest.mark.slow
def test_quantized_bundles_carry_the_report_and_inspect_shows_it(fp32_bundle, tiny_checkpoint, heldout_dir, tmp_path):
    from typer.testing import CliRunner

    from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle
    from pue.cli.export_app import app
    from pue.errors import GateFailedError

    info = json.loads((tiny_checkpoint("llava_next", "gains-few") / "pue_tiny.json").read_text())["outliers"]
    out = tmp_path / "int8-dynamic"
    # No float fallback: the report is measured before any search step (35 s of the search saved, measured).
    options = QuantizeOptions(
        precision="int8-dynamic", num_patches=8, num_captions=4, heldout=heldout_dir, fallback=False
    )
    try:
        quantize_bundle(fp32_bundle("llava_next", "gains-few"), out, options)
        report = json.loads((out / "fidelity.json").read_text())
    except GateFailedError as failure:  # the measurements travel with a failed gate too
        report = failure.report
    outliers = report["outliers"]
    assert outliers["channel_outlier_tensors"] >= 1
    assert set(outliers["worst"][0]["top_channels"]) == set(info["channels"])
    if out.exists():
        shown = CliRunner().invoke(app, ["inspect", str(out)])
        assert shown.exit_code == 0 and "activation outliers of the FP32 parent" in shown.output
