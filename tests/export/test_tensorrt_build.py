"""`pue-export trt` with a fake TensorRT (tests/tensorrt_fakes.py): what is asked of the builder, what the engine
bundle holds, the gate, and every refusal, each of which writes nothing."""

from __future__ import annotations

import json

import pytest
import tensorrt_fakes as fakes
import tiny_bundle
from typer.testing import CliRunner

from pue.bundle import manifest_sha256, read_manifest, verify_files, write_manifest
from pue.cli.export_app import app
from pue.errors import EXIT_GATE_FAILED, GateFailedError, MissingDependencyError, PueError
from pue.export.tensorrt.build import TrtOptions, build_engine_bundle
from pue.export.tensorrt.profiles import parse_batch
from pue.runtime.backends.tensorrt_compat import EngineMetadata

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

STRONGLY_TYPED = 1 << 5  # the fake's NetworkDefinitionCreationFlag.STRONGLY_TYPED


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return tiny_bundle.make_tiny_bundle(tmp_path_factory.mktemp("trt-build") / "parent")


@pytest.fixture(scope="module")
def gate_set():
    return tiny_bundle.small_gate_set(4)


def build(parent, output, gate_set, **options):
    return build_engine_bundle(parent, output, TrtOptions(**options), gate_set=gate_set)


def nothing_written(tmp_path, name="engines"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(name) or p.name.startswith(f".{name}")]
    return leftovers == []


def test_engine_bundle(monkeypatch, parent, gate_set, tmp_path):
    trt, _ = fakes.install(monkeypatch)
    result = build(parent, tmp_path / "engines", gate_set, timing_cache=tmp_path / "timing.cache")
    bundle = result.bundle
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)  # every named file inside the bundle and matching its sha256
    assert (manifest.backend, manifest.target, manifest.precision) == ("tensorrt", "tensorrt", "fp32")
    assert {n: g.file.path for n, g in manifest.graphs.items()} == {
        "vision": "engines/vision.plan",
        "decoder": "engines/decoder.plan",
    }
    assert sorted(manifest.files) == ["engines/decoder.json", "engines/vision.json", "fidelity.json"]
    assert manifest.lineage.parent_sha256 == manifest_sha256(parent)
    assert manifest.lineage.parent_precision == "fp32"
    assert (bundle / "tokenizer.json").read_bytes() == (parent / "tokenizer.json").read_bytes()
    assert manifest.versions["tensorrt"] == "10.14.1.48" and manifest.versions["cuda_runtime"] == "12.8"
    assert manifest.fidelity["gate"]["passed"] and manifest.fidelity["gate"]["overall"]["mean_cosine"] > 0.9999
    assert json.loads((bundle / "fidelity.json").read_text())["passed"]
    summary = manifest.export.tensorrt
    assert summary.batch == "1:8:32" and summary.max_seq == 128
    assert manifest.export.patch_size == read_manifest(parent).export.patch_size  # the parent's record, kept
    assert summary.rebuild_command.startswith(f"pue-export trt {parent.resolve()} -o {bundle.resolve()} ")

    vision = EngineMetadata.read(bundle / "engines" / "vision.json")
    assert vision.engine == "engines/vision.plan" and vision.engine_bytes == manifest.graphs["vision"].file.size
    assert vision.source_onnx_sha256 == read_manifest(parent).graphs["vision"].file.sha256
    assert vision.built_on.gpu_name == "NVIDIA H100 80GB HBM3" and vision.built_on.compute_capability == (9, 0)
    assert vision.build_flags.strongly_typed and vision.build_flags.timing_cache == str(tmp_path / "timing.cache")
    assert vision.build_seconds >= 0

    # strongly typed networks, no precision or other builder flags, one profile each, progress reported
    assert trt.record["network_flags"] == [STRONGLY_TYPED, STRONGLY_TYPED]
    assert trt.record["flags"] == [] and trt.record["pool_limits"] == []
    assert trt.record["profiles"][1]["image_features"] == ((1, 1, 8), (8, 3, 8), (32, 3, 8))
    assert trt.record["progress_monitor"] == [True, True]
    # the timing cache: empty at first, handed from the vision build to the decoder build, then saved
    assert trt.record["timing_cache_in"] == [b"", b"|vision.onnx"]
    assert (tmp_path / "timing.cache").read_bytes() == b"|vision.onnx|decoder.onnx"


def test_the_timing_cache_is_reused(monkeypatch, parent, gate_set, tmp_path):
    (tmp_path / "timing.cache").write_bytes(b"earlier")
    trt, _ = fakes.install(monkeypatch)
    build(parent, tmp_path / "engines", gate_set, timing_cache=tmp_path / "timing.cache")
    assert trt.record["timing_cache_in"][0] == b"earlier"
    assert (tmp_path / "timing.cache").read_bytes() == b"earlier|vision.onnx|decoder.onnx"


def test_a_foreign_timing_cache_is_replaced(monkeypatch, parent, gate_set, tmp_path):
    (tmp_path / "timing.cache").write_bytes(b"MISMATCH")
    trt, _ = fakes.install(monkeypatch)
    messages = []
    build_engine_bundle(
        parent,
        tmp_path / "engines",
        TrtOptions(timing_cache=tmp_path / "timing.cache"),
        gate_set=gate_set,
        progress=messages.append,
    )
    assert any("starting a fresh one" in m for m in messages)
    assert trt.record["timing_cache_in"][0] == b""


def test_build_flags_reach_tensorrt_and_the_metadata(monkeypatch, parent, gate_set, tmp_path):
    trt, _ = fakes.install(monkeypatch)
    result = build(
        parent,
        tmp_path / "engines",
        gate_set,
        batch=parse_batch("2:4:16"),
        max_seq=96,
        workspace_gb=2,
        version_compatible=True,
        hardware_compat="ampere+",
    )
    assert trt.record["flags"] == ["VERSION_COMPATIBLE", "VERSION_COMPATIBLE"]
    assert trt.record["hardware_levels"] == ["AMPERE_PLUS", "AMPERE_PLUS"]
    assert trt.record["pool_limits"] == [("WORKSPACE", 2 << 30)] * 2
    flags = result.engines["decoder"].build_flags
    assert (flags.version_compatible, flags.hardware_compat, flags.workspace_bytes) == (True, "ampere_plus", 2 << 30)
    assert result.engines["decoder"].profiles["input_ids"].max == (16, 96)
    assert read_manifest(result.bundle).default_batch_size == 4
    command = read_manifest(result.bundle).export.tensorrt.rebuild_command
    assert "--batch 2:4:16 --max-seq 96 --workspace 2 --version-compatible --hardware-compat ampere_plus" in command


def test_ampere_plus_needs_an_ampere_gpu(monkeypatch, parent, gate_set, tmp_path):
    fakes.install(monkeypatch, fakes.FakeCudart(name="Tesla T4", capability=(7, 5)))
    with pytest.raises(PueError, match="ampere_plus needs an Ampere or newer GPU.*sm_75"):
        build(parent, tmp_path / "engines", gate_set, hardware_compat="ampere_plus")
    with pytest.raises(PueError, match="unknown --hardware-compat 'turing'"):
        build(parent, tmp_path / "engines", gate_set, hardware_compat="turing")
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("precision", "target", "wanted"),
    [("int8-dynamic", "onnxruntime", "int8"), ("int8", "onnxruntime", "int8"), ("fp16", "onnxruntime", "fp16")],
)
def test_unsuitable_parents_are_refused_with_the_command_that_makes_one(
    monkeypatch, parent, gate_set, tmp_path, precision, target, wanted
):
    fakes.install(monkeypatch)
    bundle = tmp_path / "parent"
    tiny_bundle.make_tiny_bundle(bundle, precision=precision, target=target)
    with pytest.raises(PueError) as error:
        build(bundle, tmp_path / "engines", gate_set)
    assert f"is a {precision} bundle for target '{target}'" in str(error.value)
    assert f"`pue-export quantize FP32_BUNDLE -o OUT --precision {wanted} --target tensorrt`" in str(error.value)
    assert nothing_written(tmp_path)


def test_engine_bundles_are_not_parents(monkeypatch, parent, gate_set, tmp_path):
    fakes.install(monkeypatch)
    engines = build(parent, tmp_path / "engines", gate_set).bundle
    with pytest.raises(PueError, match="already holds TensorRT engines"):
        build(engines, tmp_path / "again", gate_set)
    manifest = read_manifest(parent)
    manifest.precision = "fp8"
    write_manifest(tmp_path / "engines", manifest)  # any readable manifest will do for this refusal
    with pytest.raises(PueError, match="takes fp32, fp16 or int8 bundles"):
        build(tmp_path / "engines", tmp_path / "again", gate_set)


def test_without_tensorrt_nothing_is_written(monkeypatch, parent, gate_set, tmp_path):
    fakes.install(monkeypatch)
    fakes.hide(monkeypatch, "tensorrt")
    with pytest.raises(MissingDependencyError, match=r'pip install "pue\[tensorrt\]"'):
        build(parent, tmp_path / "engines", gate_set, timing_cache=tmp_path / "timing.cache")
    assert list(tmp_path.iterdir()) == []


def test_without_a_gpu_nothing_is_written(monkeypatch, parent, gate_set, tmp_path):
    fakes.install(monkeypatch, fakes.FakeCudart(gpus=0))
    with pytest.raises(PueError, match="no CUDA GPU is usable here"):
        build(parent, tmp_path / "engines", gate_set)
    with pytest.raises(PueError, match="built on the GPU they will run on"):
        build(parent, tmp_path / "engines", gate_set, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_gate_writes_the_report_and_no_bundle(monkeypatch, parent, gate_set, tmp_path):
    fakes.install(monkeypatch, noise=0.5)
    with pytest.raises(GateFailedError) as error:
        build(parent, tmp_path / "engines", gate_set)
    assert error.value.exit_code == EXIT_GATE_FAILED
    assert "fidelity gate (TensorRT engines vs parent) FAILED: all items mean cosine" in str(error.value)
    report = json.loads((tmp_path / "engines.gate-failed.json").read_text())
    assert report["gate"]["passed"] is False and report["gate"]["overall"]["mean_cosine"] < 0.995
    assert set(report["engines"]) == {"vision", "decoder"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines.gate-failed.json"]


def test_builder_and_parser_failures_are_clear(monkeypatch, parent, gate_set, tmp_path):
    fakes.install(monkeypatch, fail_build=True)
    with pytest.raises(PueError, match=r"failed to build the vision engine \(out of memory while building"):
        build(parent, tmp_path / "engines", gate_set)
    fakes.install(monkeypatch, parse_ok=False)
    with pytest.raises(PueError, match="parser rejected vision.onnx: In node 3"):
        build(parent, tmp_path / "engines", gate_set)
    assert nothing_written(tmp_path)


def test_existing_output_needs_overwrite(monkeypatch, parent, gate_set, tmp_path):
    fakes.install(monkeypatch)
    (tmp_path / "engines").mkdir()
    with pytest.raises(PueError, match="already exists"):
        build(parent, tmp_path / "engines", gate_set)


# --- the command line ------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def shipped_gate(monkeypatch, gate_set):
    """The CLI uses GateSet.default(); keep it small here."""
    monkeypatch.setattr("pue.gate_set.GateSet.default", classmethod(lambda cls, heldout=None: gate_set))


def test_cli_builds_and_reports(monkeypatch, parent, tmp_path, shipped_gate):
    fakes.install(monkeypatch)
    result = runner.invoke(app, ["trt", str(parent), "-o", str(tmp_path / "engines"), "--batch", "1:4:8"])
    assert result.exit_code == 0, result.output
    assert "TensorRT engines" in result.output and "PASSED" in result.output and "wrote" in result.output
    result = runner.invoke(app, ["trt", str(parent), "-o", str(tmp_path / "engines"), "--json", "--overwrite"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{") :])
    assert data["gate"]["passed"] and data["engines"]["vision"]["engine"] == "engines/vision.plan"


def test_cli_exit_codes(monkeypatch, parent, tmp_path, shipped_gate):
    fakes.install(monkeypatch)
    fakes.hide(monkeypatch, "tensorrt")
    result = runner.invoke(app, ["trt", str(parent), "-o", str(tmp_path / "engines")])
    assert result.exit_code == 1 and 'pip install "pue[tensorrt]"' in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []
    fakes.install(monkeypatch, noise=0.5)
    result = runner.invoke(app, ["trt", str(parent), "-o", str(tmp_path / "engines")])
    assert result.exit_code == 3 and "FAILED" in result.output
    assert (tmp_path / "engines.gate-failed.json").exists() and not (tmp_path / "engines").exists()
    result = runner.invoke(app, ["trt", str(parent), "-o", str(tmp_path / "engines"), "--batch", "8:1:4"])
    assert result.exit_code == 1 and "MIN:OPT:MAX" in result.output
