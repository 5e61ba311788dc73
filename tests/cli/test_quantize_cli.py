"""`pue-export quantize` through the command line on the `ci` preset: a gated INT8-dynamic bundle with its lineage,
fidelity report and resource plan (in its own process), and an existing output refused without --overwrite."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pue.bundle import manifest_sha256, read_manifest, verify_files
from pue.cli.export_app import app

runner = CliRunner()  # slow (tests/conftest.py): the session's FP32 export of the ci model, then calibration, the gate


def quantize(parent, out, heldout, *extra: str):
    args = ["quantize", str(parent), "-o", str(out), "--precision", "int8-dynamic", "--num-patches", "16"]
    return runner.invoke(app, [*args, "--heldout", str(heldout), *extra])


def test_quantize_int8_dynamic_as_users_run_it(fp32_bundle, heldout_dir, tmp_path):
    """In its own process, as users run it: a gated bundle with its lineage and report printed by --json; the
    resource plan printed first, and an upper bound of every phase's measured peak."""
    parent = fp32_bundle("llava_next", "ci")
    out = tmp_path / "int8-dynamic"
    command = [sys.executable, "-m", "pue.cli.export_app", "quantize", str(parent), "-o", str(out)]
    command += ["--precision", "int8-dynamic", "--num-patches", "16", "--heldout", str(heldout_dir), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)

    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert manifest.precision == "int8-dynamic"
    assert manifest.lineage.parent_sha256 == manifest_sha256(parent)
    assert manifest.lineage.parent_precision == "fp32"
    report = json.loads((out / "fidelity.json").read_text())
    assert printed == report
    assert report["precision"] == "int8-dynamic" and report["target"] == "onnxruntime"
    gate = report["gate"]
    assert gate["passed"] and gate["overall"]["mean_cosine"] >= 0.995 and gate["overall"]["top1"] >= 0.98
    assert report["int8_flop_share"] >= 0.8
    assert "fidelity.json" in manifest.files  # hashed, so verify_files checked it
    assert not list(tmp_path.glob("*.gate-failed.json"))

    assert "expected peak RAM" in done.stderr  # printed before calibrating
    resources = report["resources"]
    # images, texts, composed rows, and image sets (an eighth as many as patches)
    assert resources["plan"]["graphs"]["decoder"]["rows_per_pass"] == 16 + 32 + 4 + 2
    measured = resources["measured_peak_mb"]
    assert set(measured) >= {"prepare", "outlier report", "statistics", "quantization", "check", "gate"}
    assert 0 < max(measured.values()) * 2**20 <= resources["plan"]["peak_host_bytes"]


def test_existing_output_needs_overwrite(fp32_bundle, heldout_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = quantize(fp32_bundle("llava_next", "ci"), out, heldout_dir)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0] and "Traceback" not in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_the_printed_gate_shows_the_check_on_fitted_and_unseen_items(quantized_bundle):
    from rich.console import Console

    from pue.cli.quantize_commands import _print_fidelity

    out, _ = quantized_bundle("int8", "onnxruntime")
    report = json.loads((out / "fidelity.json").read_text())
    console = Console(record=True, width=200)
    _print_fidelity(console, report)
    text = console.export_text()
    fitted, unseen = report["check"]["fitted"], report["check"]["unseen"]["overall"]
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 2}
    for label, overall in (("fitted", fitted), ("unseen", unseen)):
        shown = f"mean {overall['mean_cosine']:.5f} / min {overall['min_cosine']:.5f}"
        assert shown in rows[f"calibration check, {label} items"]


@pytest.mark.parametrize(("target", "how"), [("openvino", "by OpenVINO at run time"), ("onnxruntime", "each row")])
def test_the_printed_gate_says_how_the_per_token_ops_are_quantized(quantized_bundle, target, how):
    from rich.console import Console

    from pue.cli.quantize_commands import _print_fidelity

    out, _ = quantized_bundle("int8", "onnxruntime")
    report = {**json.loads((out / "fidelity.json").read_text()), "target": target, "per_token_nodes": ["a", "b"]}
    console = Console(record=True, width=200)
    _print_fidelity(console, report)
    row = next(line for line in console.export_text().splitlines() if "ops quantized per token" in line)
    assert "│ 2 " in row.replace("  ", " ") and how in row


@pytest.mark.parametrize(
    ("verdict", "shown"),
    [
        ("clear", "the error is the quantizer's"),
        ("tight", "little room for 8 bits"),
        ("fails", "the model itself is rounding-sensitive"),
    ],
)
def test_the_printed_gate_shows_the_parents_rounding_floor(quantized_bundle, verdict, shown):
    from rich.console import Console

    from pue.cli.quantize_commands import _print_fidelity

    out, _ = quantized_bundle("int8", "onnxruntime")
    overall = {"count": 3, "mean_cosine": 0.99, "min_cosine": 0.9123, "top1": 1.0}
    floor = {"passed": verdict != "fails", "verdict": verdict, "overall": overall}
    report = {**json.loads((out / "fidelity.json").read_text()), "rounding_floor": floor}
    console = Console(record=True, width=220)
    _print_fidelity(console, report)
    row = next(line for line in console.export_text().splitlines() if "bf16 arithmetic" in line)
    assert "min 0.91230" in row and shown in row


def test_floor_measures_an_fp32_bundle_against_itself_and_refuses_a_quantized_one(
    fp32_bundle, quantized_bundle, heldout_dir
):
    parent = fp32_bundle("llava_next", "ci")
    before = sorted(p.name for p in parent.iterdir())
    result = runner.invoke(app, ["floor", str(parent), "--heldout", str(heldout_dir), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    # the ci preset (no outliers) is far from its floor: bf16 rounding alone keeps almost the whole allowance
    assert record["passed"] and record["verdict"] == "clear" and record["headroom"] > 0.5
    assert record["overall"]["count"] >= 6 and record["overall"]["min_cosine"] > 0.99
    assert sorted(p.name for p in parent.iterdir()) == before  # the rounded graphs were staged elsewhere
    verify_files(parent, read_manifest(parent))

    shown = runner.invoke(app, ["floor", str(parent), "--heldout", str(heldout_dir)])
    assert shown.exit_code == 0 and "room for INT8's error" in shown.output

    out, _ = quantized_bundle("int8", "onnxruntime")
    refused = runner.invoke(app, ["floor", str(out)])
    assert refused.exit_code == 1 and "holds int8 graphs" in refused.output and "pue-export onnx" in refused.output
