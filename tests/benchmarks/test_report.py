"""Latency reports from synthetic rows: schema, Markdown, PNG, the report-directory rule, the environment."""

from __future__ import annotations

import json

import pytest

from pue.benchmarks.environment import collect_environment
from pue.benchmarks.peaks import GPU_DATASHEETS, gpu_best_case
from pue.benchmarks.report import (
    REQUIRED_ROW_FIELDS,
    SCHEMA_VERSION,
    check_report_dir,
    check_rows,
    render_markdown,
    write_latency_report,
)
from pue.errors import OutputExistsError, PueError


def _row(name, backend, precision, batch, items_per_s, error=None):
    row = {
        "name": name,
        "backend": backend,
        "precision": precision,
        "batch_size": batch,
        "device": "cpu",
        "p50_ms": 1000 * batch / items_per_s,
        "p90_ms": 1100 * batch / items_per_s,
        "p99_ms": 1200 * batch / items_per_s,
        "items_per_s": items_per_s,
        "peak_memory_mb": 512.0,
        "speedup_vs_reference": None,
        "speedup_vs_best_reference": None,
        "stage_ms": {"preprocess": 5.0, "tokenize": 0.1, "vision": 40.0, "decoder": 60.0},
        "peak_fraction": 0.25,
        "minutes_per_slide": 10_000 / items_per_s / 60,
    }
    if error:
        row.update(
            {
                key: None
                for key in (
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "items_per_s",
                    "peak_memory_mb",
                    "stage_ms",
                    "peak_fraction",
                    "minutes_per_slide",
                )
            },
            error=error,
        )
    return row


@pytest.fixture
def report():
    flops = 18.68e12
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "latency",
        "environment": collect_environment(),
        "settings": {
            "batch_sizes": [1, 8],
            "warmup": 2,
            "iters": 10,
            "device": "cpu",
            "threads": None,
            "images": 41,
            "image_source": "pue.data heldout",
            "patches_per_slide": 10_000,
        },
        "peaks": {
            "fp32": {"gflops": 445.0, "how": "onnxruntime MatMul 2048³"},
            "bf16": {"gflops": 900.0, "how": "torch matmul 2048³"},
            "int8": {"gflops": 1600.0, "how": "onnxruntime u8×s8 MatMulInteger 2048³"},
            "threads": 2,
        },
        "models": [
            {
                "source_checkpoint": "e5-v",
                "sha256": "ab" * 32,
                "tile_size": 224,
                "bundles": ["b"],
                "flops": {
                    "vision": 1.17e12,
                    "decoder": 17.51e12,
                    "crops": 3,
                    "image_tokens": 1176,
                    "sequence_length": 1200,
                    "source": "config",
                    "total": flops,
                },
                "gpu_best_case": gpu_best_case(flops, 10_000),
            }
        ],
        "results": [
            _row("pytorch fp32", "pytorch", "fp32", 1, 0.9),
            _row("pytorch bf16", "pytorch", "bf16", 1, 2.0),
            _row("e5v-int8", "onnxruntime", "int8-dynamic", 1, 2.3),
            _row("e5v-int8", "onnxruntime", "int8-dynamic", 8, 2.5),
            _row("e5v-fp16", "onnxruntime", "fp16", 8, 1.0, error="worker killed by signal 9 (out of memory?)"),
        ],
        "notes": ["a note"],
    }


def test_writes_json_markdown_and_png(tmp_path, report):
    paths = write_latency_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "latency.png"]
    data = json.loads(paths[0].read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    for key in ("cpu", "gpus", "versions"):
        assert key in data["environment"]
    assert {"pue", "torch", "onnxruntime", "tensorrt", "numpy"} <= set(data["environment"]["versions"])
    assert data["environment"]["cpu"]["model"]
    assert all(set(REQUIRED_ROW_FIELDS) <= set(row) for row in data["results"])
    markdown = paths[1].read_text()
    for text in (
        "pytorch fp32",
        "e5v-int8",
        "## Failures",
        "signal 9",
        "18.68 TFLOP",
        "NVIDIA H100 SXM",
        "a note",
        "× fp32 ref",
    ):
        assert text in markdown
    png = paths[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_dir_rule(tmp_path, report):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_report_dir(empty) == empty  # an existing empty directory is fine
    write_latency_report(report, empty)
    with pytest.raises(OutputExistsError):
        write_latency_report(report, empty)
    write_latency_report(report, empty, overwrite=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(PueError, match="not a directory"):
        check_report_dir(a_file, overwrite=True)


def test_rows_must_carry_the_contract_fields(report):
    check_rows(report["results"])
    del report["results"][2]["speedup_vs_best_reference"]
    with pytest.raises(PueError, match="speedup_vs_best_reference"):
        check_rows(report["results"])


def test_markdown_without_peaks_or_models(report):
    report.update(peaks=None, models=[], notes=[])
    markdown = render_markdown(report)
    assert "were not measured" in markdown
    assert "NVIDIA H100" not in markdown


def test_gpu_best_case_arithmetic():
    rows = {row["gpu"]: row for row in gpu_best_case(18.68e12, 10_000)}
    h100 = rows["NVIDIA H100 SXM"]
    assert h100["patches_per_s_fp16"] == pytest.approx(989.5 / 18.68)
    assert h100["minutes_per_slide_fp16"] == pytest.approx(10_000 * 18.68 / 989.5 / 60)
    assert h100["minutes_per_slide_int8"] == pytest.approx(h100["minutes_per_slide_fp16"] / 2, rel=1e-3)
    assert len(rows) == len(GPU_DATASHEETS)
    assert all(card.source and card.int8_tops > card.fp16_tflops for card in GPU_DATASHEETS)
