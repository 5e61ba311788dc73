"""pue-export's command line: bad inputs exit 1 with one line and write nothing; inspect verifies hashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pue.cli.export_app import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom pue.cli.export_app import app\n"
        "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    script = Path(sys.executable).parent / "pue-export"
    completed = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert completed.returncode == 0 and "tiny-model" in completed.stdout


def test_missing_checkpoint(tmp_path):
    one_line_error(run("onnx", str(tmp_path / "nope"), "-o", str(tmp_path / "out")), "does not exist")
    assert not (tmp_path / "out").exists()


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(run("onnx", str(tmp_path / "empty"), "-o", str(tmp_path / "out")), "config.json")
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(), checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "qwen3_omni"
    (checkpoint / "config.json").write_text(json.dumps(config))
    one_line_error(run("onnx", str(checkpoint), "-o", str(tmp_path / "out")), "qwen3_omni", "llava_next")


def test_corrupt_weights(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(), checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(run("onnx", str(checkpoint), "-o", str(tmp_path / "out")), "weights")
    assert not (tmp_path / "out").exists()


def test_preset_arch_pair_that_does_not_exist(tmp_path):
    one_line_error(run("tiny-model", str(tmp_path / "m"), "--arch", "llava", "--preset", "e5v"), "e5v")
    unknown = run("tiny-model", str(tmp_path / "m"), "--preset", "huge")  # a usage error: exit 2, values listed
    assert unknown.exit_code == 2 and "huge" in unknown.output and "bench" in unknown.output
    assert not (tmp_path / "m").exists()


def test_existing_output_is_untouched(fp32_bundle, tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(fp32_bundle(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(run("onnx", str(tiny_checkpoint()), "-o", str(out)), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_debug_shows_traceback(tmp_path):
    """What a user sees: with --debug the error's traceback, without it one line and none."""
    script = Path(sys.executable).parent / "pue-export"
    args = ["onnx", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]
    env = {**os.environ, "COLUMNS": "500"}  # rich wraps the traceback to the terminal's width
    debug = subprocess.run([str(script), "--debug", *args], capture_output=True, text=True, env=env)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert "export_app.py" in debug.stderr  # frames of the command itself
    assert f"CheckpointError: checkpoint '{tmp_path / 'nope'}' does not exist" in debug.stderr
    plain = subprocess.run([str(script), *args], capture_output=True, text=True, env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.splitlines() == [
        f"error: checkpoint '{tmp_path / 'nope'}' does not exist (pass a local checkpoint directory)"
    ]


def test_inspect_summary_and_json(fp32_bundle):
    bundle = fp32_bundle()
    result = run("inspect", str(bundle))
    assert result.exit_code == 0, result.output
    assert "all file hashes verified" in result.output and "PASSED" in result.output
    assert "images per row: several, placeholders joined by ''" in result.output  # the tiny chat template
    summary = json.loads(run("inspect", str(bundle), "--json").stdout)
    assert summary["tokens_per_image"] == 528 and summary["image_separator"] == ""
    assert summary["graphs"]["decoder"]["inputs"][0].startswith("input_ids int64")


def test_inspect_names_a_tampered_file(fp32_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle(), bundle)
    graph = bundle / "vision.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    one_line_error(run("inspect", str(bundle)), "vision.onnx", "sha256")


@pytest.mark.slow  # builds and exports its own checkpoints
@pytest.mark.parametrize("arch", ["llava_next", "llava"])
def test_tiny_model_then_onnx_then_inspect(tmp_path, heldout_dir, arch):
    """As a user runs it. LLaVA-NeXT is gated on the default held-out set (every shipped held-out patch), LLaVA on the
    session's `--heldout` folder (the gate subset): the architecture, not the held-out set, is what it adds."""
    from pue.data import patch_set

    checkpoint, bundle = tmp_path / "ckpt", tmp_path / "bundle"
    assert run("tiny-model", str(checkpoint), "--arch", arch).exit_code == 0
    heldout = [] if arch == "llava_next" else ["--heldout", str(heldout_dir)]
    result = run("onnx", str(checkpoint), "-o", str(bundle), "--json", *heldout)
    assert result.exit_code == 0, result.output
    gate = json.loads(result.stdout[result.stdout.index("{") :])["gate"]
    expected = len(patch_set("heldout")) if arch == "llava_next" else len(list(heldout_dir.iterdir()))
    assert gate["passed"] and gate["details"]["images"]["count"] == expected
    assert run("inspect", str(bundle)).exit_code == 0
