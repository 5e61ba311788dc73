"""Regressions of four defects a new user met (issue 11): rich markup in printed text, extras found late,
unvalidated choices, and one file named two ways in the manifest."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

from pue.bundle import FORMAT_VERSION, read_manifest
from pue.cli.bench_app import app as bench_app
from pue.cli.export_app import app

runner = CliRunner()

# LLaVA-NeXT-Mistral's chat template shape: [INST] … [/INST], images as <image>\n before the text.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} [/INST]{% elif message['role'] == 'assistant' %}{{ message['content'] }}</s>"
    "{% endif %}{% endfor %}"
)


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def quantize_args(fp32_bundle, heldout_dir):
    """The session's gate subset folder as --heldout (both stains, 6 tiles; the quantize runs here check files and
    messages, not fidelity on more tiles)."""
    return ["quantize", str(fp32_bundle()), "--heldout", str(heldout_dir), "--num-patches", "8"]


# ------------------------------------------------------------------------------------------ 1. markup


def test_mistral_template_prints_literally(tiny_checkpoint, heldout_dir, tmp_path):
    checkpoint, bundle = tmp_path / "mistral-ckpt", tmp_path / "bundle"
    shutil.copytree(tiny_checkpoint(), checkpoint)
    (checkpoint / "chat_template.jinja").write_text(MISTRAL_TEMPLATE)
    exported = run("onnx", str(checkpoint), "-o", str(bundle), "--heldout", str(heldout_dir))  # the gate subset
    assert exported.exit_code == 0, exported.output
    manifest = read_manifest(bundle)
    assert manifest.prompts.text.startswith("<s>[INST] ") and "[/INST]" in manifest.prompts.text
    result = run("inspect", str(bundle))
    assert result.exit_code == 0, result.output
    assert "MarkupError" not in result.output
    assert "[INST]" in result.output and "[/INST]" in result.output


def test_bundle_path_with_markup_prints_literally(fp32_bundle, tmp_path):
    bundle = tmp_path / "run[bold]1[/bold]"
    shutil.copytree(fp32_bundle(), bundle)
    result = run("inspect", str(bundle))
    assert result.exit_code == 0, result.output
    assert "run[bold]1[/bold]" in result.output.replace("\n", "")


def test_error_quoting_a_markup_path_prints_literally(tmp_path):
    missing = tmp_path / "[/INST][bold]nope"
    result = run("inspect", str(missing))
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "[/INST][bold]nope" in errors[0], result.output


# ------------------------------------------------------------------------------------------ 2. extras


def block_modules(monkeypatch, *names: str) -> None:
    """Make `names` look uninstalled: importing them raises ImportError, find_spec finds nothing."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_demo_without_bench_refuses_before_any_work(monkeypatch, tmp_path):
    block_modules(monkeypatch, "matplotlib")
    workdir = tmp_path / "demo"
    result = run("demo", "--workdir", str(workdir))
    assert result.exit_code == 1, result.output
    assert 'pip install "pue[bench]"' in result.output
    assert not workdir.exists()  # refused before the checkpoint was built


def test_bench_report_without_bench_refuses_before_any_work(monkeypatch, tmp_path):
    block_modules(monkeypatch, "matplotlib")
    result = runner.invoke(bench_app, ["latency", str(tmp_path / "no-bundle"), "--report", str(tmp_path / "r")])
    assert result.exit_code == 1, result.output
    assert 'pip install "pue[bench]"' in result.output
    assert not (tmp_path / "r").exists()


def test_quantize_from_an_openslide_format_without_slides_refuses_first(monkeypatch, quantize_args, tmp_path):
    block_modules(monkeypatch, "openslide")
    slide = tmp_path / "case.ndpi"
    slide.write_bytes(b"not read: refused before")
    result = run(*quantize_args, "-o", str(tmp_path / "out"), "--precision", "int8", "--calib", str(slide))
    assert result.exit_code == 1, result.output
    assert 'pip install "pue[slides]"' in result.output and "case.ndpi" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quantize_without_matplotlib_writes_the_bundle_without_its_plot(monkeypatch, quantize_args, tmp_path, caplog):
    block_modules(monkeypatch, "matplotlib")
    out = tmp_path / "int8-dynamic"
    result = run(*quantize_args, "-o", str(out), "--precision", "int8-dynamic")
    assert result.exit_code == 0, result.output
    assert not (out / "fidelity.png").exists() and (out / "fidelity.json").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "fidelity.png" in r.getMessage()]
    assert len(warnings) == 1 and 'not written: matplotlib is not installed (pip install "pue[bench]")' in warnings[0]
    assert "fidelity.png" not in read_manifest(out).files


# ------------------------------------------------------------------------------------------ 3. choices


@pytest.mark.parametrize(
    ("option", "value", "valid"),
    [
        ("--calibration-method", "foo", "minmax"),
        ("--precision", "int4", "int8-dynamic"),
        ("--target", "tpu", "tensorrt"),
        ("--attention", "flash", "fused"),
    ],
)
def test_bad_choice_is_a_usage_error_listing_the_values(quantize_args, tmp_path, option, value, valid):
    args = [*quantize_args, "-o", str(tmp_path / "out"), "--precision", "int8"]
    result = run(*args, option, value)
    assert result.exit_code == 2, result.output
    assert value in result.output and valid in result.output
    assert not (tmp_path / "out").exists()


def test_other_commands_validate_their_choices(tmp_path):
    assert run("tiny-model", str(tmp_path / "m"), "--arch", "gpt2").exit_code == 2
    assert run("onnx", str(tmp_path), "-o", str(tmp_path / "b"), "--exporter", "tf2onnx").exit_code == 2
    assert run("onnx", str(tmp_path), "-o", str(tmp_path / "b"), "--dtype", "int8").exit_code == 2
    assert run("trt", str(tmp_path), "-o", str(tmp_path / "e"), "--hardware-compat", "turing").exit_code == 2
    bad = runner.invoke(bench_app, ["latency", str(tmp_path), "--reference-precisions", "fp32,int4"])
    assert bad.exit_code == 2 and "bf16" in bad.output, bad.output
    assert "minmax" in run("quantize", "--help").output


# ------------------------------------------------------------------------------------------ 4. one name per file


def test_old_manifest_names_are_read_as_file_names(fp32_bundle, tmp_path):
    from pue.bundle import FORMAT_VERSION, file_entry, verify_files

    bundle = tmp_path / "old"
    shutil.copytree(fp32_bundle(), bundle)
    (bundle / "fidelity.json").write_text("{}\n")
    data = json.loads((bundle / "manifest.json").read_text())
    data["format_version"] = 1  # what the first bundles wrote, with role names as keys
    data["files"] = {"fidelity": vars(file_entry(bundle, "fidelity.json"))}
    (bundle / "manifest.json").write_text(json.dumps(data))
    manifest = read_manifest(bundle)
    assert list(manifest.files) == ["fidelity.json"] and manifest.format_version == FORMAT_VERSION
    verify_files(bundle, manifest)


@pytest.mark.slow
def test_quantize_names_files_by_their_file_name(quantize_args, tmp_path):
    out = tmp_path / "int8-dynamic"
    result = run(*quantize_args, "-o", str(out), "--precision", "int8-dynamic")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert sorted(manifest["files"]) == ["calibration.json", "fidelity.json", "fidelity.png"]
    assert all(key == entry["path"] for key, entry in manifest["files"].items())
