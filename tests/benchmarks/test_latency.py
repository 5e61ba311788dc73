"""`pue-bench latency` end to end on the tiny bundle (schema and sanity of the numbers, never timing thresholds),
the row arithmetic (percentiles, speed-ups, peak fractions) on synthetic values, and `pue-bench pmeb`'s wiring."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from pue.benchmarks.latency import reference_precisions_for
from pue.benchmarks.latency_rows import add_limits, add_speedups, latency_stats
from pue.benchmarks.peaks import peak_for
from pue.benchmarks.report import REQUIRED_ROW_FIELDS, SCHEMA_VERSION
from pue.cli.bench_app import app
from pue.errors import PueError

runner = CliRunner()


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ------------------------------------------------------------------------------------------------ arithmetic


def test_latency_stats():
    stats = latency_stats([10.0, 20.0, 30.0, 40.0], batch_size=2)
    assert stats["p50_ms"] == pytest.approx(25.0)
    assert stats["p90_ms"] == pytest.approx(37.0)
    assert stats["p99_ms"] == pytest.approx(39.7)
    assert stats["mean_ms"] == pytest.approx(25.0)
    assert stats["items_per_s"] == pytest.approx(2 * 4 / 0.1)  # 8 items in 100 ms
    with pytest.raises(PueError):
        latency_stats([], 1)
    with pytest.raises(PueError):
        latency_stats([1.0, float("nan")], 1)


def _rows():
    return [
        {
            "name": "pytorch fp32",
            "backend": "pytorch",
            "precision": "fp32",
            "batch_size": 1,
            "items_per_s": 2.0,
            "device": "cpu",
            "flops_per_item": 1e9,
        },
        {
            "name": "pytorch bf16",
            "backend": "pytorch",
            "precision": "bf16",
            "batch_size": 1,
            "items_per_s": 4.0,
            "device": "cpu",
            "flops_per_item": 1e9,
        },
        {
            "name": "int8",
            "backend": "onnxruntime",
            "precision": "int8-dynamic",
            "batch_size": 1,
            "items_per_s": 8.0,
            "device": "cpu",
            "flops_per_item": 1e9,
        },
        {
            "name": "int8",
            "backend": "onnxruntime",
            "precision": "int8-dynamic",
            "batch_size": 8,
            "items_per_s": 9.0,
            "device": "cpu",
            "flops_per_item": 1e9,
        },
        {
            "name": "fp16",
            "backend": "onnxruntime",
            "precision": "fp16",
            "batch_size": 1,
            "items_per_s": None,
            "device": "cpu",
            "flops_per_item": 1e9,
            "error": "boom",
        },
    ]


def test_best_of_rounds_by_hand():
    from pue.benchmarks.latency_rows import best_of_rounds

    def row(name, batch, speed):
        return {"name": name, "batch_size": batch, "items_per_s": speed}

    first = [row("ref", 1, 1.0), row("ref", 8, 0.5), row("int8", 8, 2.0)]
    second = [row("int8", 8, 2.5), row("ref", 8, None), row("ref", 1, 0.8)]  # reversed order; one failed run
    merged = best_of_rounds([first, second], order=["ref", "int8"])
    assert [(r["name"], r["batch_size"], r["items_per_s"]) for r in merged] == [
        ("ref", 1, 1.0),
        ("ref", 8, 0.5),
        ("int8", 8, 2.5),
    ]
    assert merged[1]["round_items_per_s"] == [0.5, None]
    assert "round_items_per_s" not in best_of_rounds([first], order=["ref", "int8"])[0]


def test_speedups_over_fp32_and_best_reference():
    rows = _rows()
    add_speedups(rows)
    by = {(row["name"], row["batch_size"]): row for row in rows}
    assert by["pytorch fp32", 1]["speedup_vs_reference"] == pytest.approx(1.0)
    assert by["pytorch bf16", 1]["speedup_vs_reference"] == pytest.approx(2.0)
    assert by["pytorch bf16", 1]["speedup_vs_best_reference"] == pytest.approx(1.0)
    assert by["int8", 1]["speedup_vs_reference"] == pytest.approx(4.0)
    assert by["int8", 1]["speedup_vs_best_reference"] == pytest.approx(2.0)
    assert by["int8", 8]["speedup_vs_reference"] is None  # no reference row at batch 8
    assert by["fp16", 1]["speedup_vs_reference"] is None  # failed row


def test_peak_fraction_uses_the_precision_class():
    peaks = {"fp32": {"gflops": 100.0}, "bf16": {"gflops": 200.0}, "int8": {"gflops": 400.0}, "fp16": {"gflops": 800.0}}
    assert peak_for(peaks, "fp32", "cpu") == 100.0
    assert peak_for(peaks, "int8-dynamic", "cpu") == 400.0
    assert peak_for(peaks, "fp16", "cpu") == 100.0  # onnxruntime computes fp16 in fp32 on CPU
    assert peak_for(peaks, "fp16", "cuda") == 800.0
    assert peak_for(None, "fp32", "cpu") is None
    rows = _rows()
    add_limits(rows, peaks, patches_per_slide=10_000)
    fp32, bf16, int8 = rows[0], rows[1], rows[2]
    assert fp32["achieved_gflops"] == pytest.approx(2.0) and fp32["peak_fraction"] == pytest.approx(0.02)
    assert bf16["peak_fraction"] == pytest.approx(4.0 / 200.0)
    assert int8["peak_fraction"] == pytest.approx(8.0 / 400.0)
    assert fp32["minutes_per_slide"] == pytest.approx(10_000 / 2.0 / 60)
    assert rows[4]["peak_fraction"] is None and rows[4]["minutes_per_slide"] is None


def test_reference_precisions():
    assert reference_precisions_for("cuda") == ["fp32", "fp16"]
    assert reference_precisions_for("cpu")[0] == "fp32"
    assert reference_precisions_for("cpu", ["bf16", "bf16"]) == ["bf16"]
    with pytest.raises(PueError, match="unknown reference precision"):
        reference_precisions_for("cpu", ["fp8"])


# ------------------------------------------------------------------------------------------------ end to end


def test_latency_end_to_end_with_reference(fp32_bundle, tiny_checkpoint, tmp_path):
    bundle, checkpoint = fp32_bundle("llava_next", "ci"), tiny_checkpoint("llava_next", "ci")
    report_dir = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "latency",
            str(bundle),
            "--reference",
            str(checkpoint),
            "--batch-sizes",
            "1,2",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--threads",
            "1",  # one thread per worker: OpenMP's spinning threads crawl on a machine busy with other tests
            "--report",
            str(report_dir),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "latency.png"):
        assert (report_dir / name).stat().st_size > 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["schema_version"] == SCHEMA_VERSION
    assert {"cpu", "gpus", "versions"} <= set(report["environment"])
    rows = report["results"]
    expected_references = reference_precisions_for("cpu")
    names = {row["name"] for row in rows}
    assert names == {f"pytorch {p}" for p in expected_references} | {bundle.name}
    assert len(rows) == 2 * (len(expected_references) + 1)
    for row in rows:
        assert set(REQUIRED_ROW_FIELDS) <= set(row) and "error" not in row
        for field in (
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "items_per_s",
            "peak_memory_mb",
            "speedup_vs_reference",
            "speedup_vs_best_reference",
            "minutes_per_slide",
            "flops_per_item",
            "peak_fraction",
        ):
            assert _positive(row[field]), (row["name"], field, row[field])
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert _positive(row["stage_ms"]["vision"]) and _positive(row["stage_ms"]["decoder"])
        assert row["device"] == "cpu" and row["threads"] == 1
    reference_rows = [row for row in rows if row["backend"] == "pytorch"]
    assert {row["precision"] for row in reference_rows} == set(expected_references)
    fp32_reference = [row for row in reference_rows if row["precision"] == "fp32"]
    assert all(row["speedup_vs_reference"] == pytest.approx(1.0) for row in fp32_reference)
    bundle_rows = [row for row in rows if row["backend"] == "onnxruntime"]
    assert {row["precision"] for row in bundle_rows} == {"fp32"}
    model = report["models"][0]
    assert model["flops"]["source"] == "config" and model["flops"]["image_tokens"] == 528
    assert len(model["gpu_best_case"]) >= 5
    assert all(_positive(report["peaks"][key]["gflops"]) for key in ("fp32", "int8"))
    assert report["peaks"]["threads"] == 1 and report["settings"]["threads"] == 1
    assert json.loads(result.stdout)["results"] == rows


def test_latency_without_reference_reports_a_broken_bundle_and_exits_1(fp32_bundle, tmp_path):
    good = fp32_bundle("llava_next", "ci")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    with open(broken / "tokenizer.json", "a") as handle:
        handle.write(" ")  # size no longer matches the manifest: the worker's Embedder.load refuses it
    report_dir = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "latency",
            str(good),
            str(broken),
            "--batch-sizes",
            "1",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--no-peaks",
            "--rounds",
            "2",
            "--report",
            str(report_dir),
        ],
    )
    assert result.exit_code == 1
    assert "1 of 2 rows failed" in result.output and "broken" in result.output
    assert "round 2 of 2" in result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert report["settings"]["rounds"] == 2
    good_row, broken_row = report["results"]
    assert _positive(good_row["items_per_s"]) and good_row["speedup_vs_reference"] is None
    assert len(good_row["round_items_per_s"]) == 2 and good_row["items_per_s"] == max(good_row["round_items_per_s"])
    assert good_row["peak_fraction"] is None  # --no-peaks
    assert "tokenizer.json" in broken_row["error"] and broken_row["p50_ms"] is None
    assert report["models"][0]["flops"]["source"] == "graph"  # no --reference: counted in the ONNX graphs
    assert "## Failures" in (report_dir / "report.md").read_text()


def test_reference_of_another_checkpoint_is_refused(fp32_bundle, tiny_checkpoint):
    result = runner.invoke(
        app,
        [
            "latency",
            str(fp32_bundle("llava_next", "ci")),
            "--reference",
            str(tiny_checkpoint("llava", "ci")),
            "--no-peaks",
        ],
    )
    assert result.exit_code == 1
    assert "not the source checkpoint" in result.output


def test_non_empty_report_dir_needs_overwrite(tmp_path, fp32_bundle):
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "report.json").write_text("{}")
    result = runner.invoke(app, ["latency", str(fp32_bundle()), "--report", str(report_dir)])
    assert result.exit_code == 1 and "--overwrite" in result.output


@pytest.mark.parametrize("argument", ["0", "1,x", ""])
def test_bad_batch_sizes(argument, fp32_bundle):
    result = runner.invoke(app, ["latency", str(fp32_bundle()), "--batch-sizes", argument, "--no-peaks"])
    assert result.exit_code == 1 and "--batch-sizes" in result.output


# ------------------------------------------------------------------------------------------------ pmeb wiring


def test_pmeb_command_prints_the_rows(monkeypatch, tmp_path):
    pmeb_runner = pytest.importorskip("pue.benchmarks.pmeb.runner")
    calls = {}

    def fake_run(bundles, data_dir, **kwargs):
        calls["run"] = (bundles, data_dir, kwargs)
        return {
            "schema_version": 1,
            "results": [
                {
                    "name": "b",
                    "backend": "onnxruntime",
                    "precision": "fp32",
                    "task": "arch",
                    "meta_task": "retrieval",
                    "metric": "recall@1",
                    "value": 0.5,
                    "reference_value": 0.5,
                    "delta": 0.0,
                    "prediction_agreement": 1.0,
                    "mean_cosine_vs_reference": 0.99999,
                }
            ],
        }

    monkeypatch.setattr(pmeb_runner, "run_pmeb", fake_run)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["pmeb", "b", "--data", str(tmp_path), "--tasks", "arch,crc", "--report", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "recall@1" in result.stdout and "0.9999" in result.stdout
    bundles, data_dir, kwargs = calls["run"]
    assert [str(b) for b in bundles] == ["b"] and str(data_dir) == str(tmp_path)
    assert kwargs["tasks"] == ["arch", "crc"] and str(kwargs["report_dir"]) == str(out)
    out.mkdir()
    (out / "report.json").write_text("{}")
    refused = runner.invoke(app, ["pmeb", "b", "--data", str(tmp_path), "--report", str(out)])
    assert refused.exit_code == 1 and "--overwrite" in refused.output


def test_each_bundle_gets_a_row_per_backend_that_runs_it():
    from types import SimpleNamespace

    from pue.benchmarks.latency import bundle_backends
    from pue.bundle import ExportInfo, QuantizationInfo
    from pue.demo import demo_backends

    root = SimpleNamespace(backend="onnxruntime", precision="fp32", target="any", export=ExportInfo())
    fused = SimpleNamespace(
        backend="onnxruntime",
        precision="int8-dynamic",
        target="onnxruntime",
        export=ExportInfo(
            quantization=QuantizationInfo("int8-dynamic", "onnxruntime", "minmax", "u8", "i8", {"mode": "fused"})
        ),
    )
    notes: list[str] = []
    backends = demo_backends(openvino_installed=True)
    assert bundle_backends("fp32", "fp32", root, backends, "cpu", notes) == [
        ("onnxruntime", "fp32"),
        ("openvino", "fp32 (openvino)"),
    ]
    assert bundle_backends("dyn", "dyn", fused, backends, "cpu", notes) == [("onnxruntime", "dyn")]
    assert len(notes) == 1 and notes[0].startswith("dyn: no openvino row: backend 'openvino' does not run fused")
    assert bundle_backends("fp32", "fp32", root, ["openvino", "auto", "onnxruntime"], "cpu", []) == [
        ("openvino", "fp32 (openvino)"),
        ("onnxruntime", "fp32"),
    ]
    assert demo_backends(openvino_installed=False) == ("auto",)


def test_latency_refuses_an_unknown_or_uninstalled_backend_before_any_work(tmp_path, monkeypatch):
    import sys

    result = runner.invoke(app, ["latency", str(tmp_path), "--backends", "auto,coreml"])
    assert result.exit_code == 1 and "unknown backend 'coreml'" in result.output
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr("pue.extras._installed", lambda module: module != "openvino")
    result = runner.invoke(app, ["latency", str(tmp_path), "--backends", "openvino"])
    assert result.exit_code == 1 and 'pip install "pue[openvino]"' in result.output
