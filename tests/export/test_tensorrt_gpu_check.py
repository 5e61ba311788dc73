"""The CPU-side pieces of scripts/gpu_check.py: arguments, the plan (what runs, what does not and why), the table,
the JSON, the latency arithmetic. The script itself runs on a GPU machine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as `python scripts/gpu_check.py` runs it: its folder first on the path (it imports
    gpu_check_report from there)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)
        sys.modules.pop("gpu_check_report", None)
        sys.path.remove(str(SCRIPT.parent))


def test_dry_run_prints_the_table_and_writes_json(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path / "check.json")]) == 0
    printed = capsys.readouterr().out
    assert "pytorch-fp32" in printed and "tensorrt-fp32" in printed and "b8 items/s" in printed
    assert "notes (what was not run, and why):" in printed and printed.rstrip().endswith("check.json")
    data = json.loads((tmp_path / "check.json").read_text())
    assert data["dry_run"] and data["passed"] and data["failed"] == []
    statuses = {row["name"]: row["status"] for row in data["results"]}
    assert statuses["pytorch-fp32"] == "dry-run" and statuses["tensorrt-fp32"] == "not run"
    reasons = {entry["name"]: entry["reason"] for entry in data["not_run"]}
    assert reasons["tensorrt-fp32"] == "needs a CUDA GPU (--device cpu)"
    assert set(reasons) == {"pytorch-fp16", "onnxruntime-cuda-fp32", "onnxruntime-tensorrt-ep-fp32", "tensorrt-fp32"}
    assert "torch" in data["environment"]  # versions, found without importing anything heavy


def test_the_plan_says_why_gpu_backends_are_missing(gpu_check):
    environment = {
        "onnxruntime": "1.30.0",
        "onnxruntime-gpu": None,
        "onnxruntime_providers": ["CPUExecutionProvider"],
        "tensorrt_importable": False,
        "cuda_python_importable": False,
    }
    rows = {row.name: row for row in gpu_check.plan_rows("cuda", environment)}
    assert all(rows[f"pytorch-{p}"].status == "planned" for p in ("fp32", "fp16", "bf16"))
    assert rows["onnxruntime-cpu-fp32"].status == "planned"
    assert rows["onnxruntime-cuda-fp32"].reason.startswith(
        "onnxruntime has no CUDA provider (onnxruntime 1.30.0, onnxruntime-gpu not installed"
    )
    assert rows["tensorrt-fp32"].reason == "tensorrt is not installed (cannot pip install here)"
    environment.update(
        tensorrt_importable=True, onnxruntime_providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    rows = {row.name: row for row in gpu_check.plan_rows("cuda", environment)}
    assert rows["onnxruntime-cuda-fp32"].status == "planned"
    assert rows["tensorrt-fp32"].reason == "cuda-python (cuda.bindings) is not installed"


def test_arguments(gpu_check, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_check.parse_args([])
    assert args.out == tmp_path / "gpu_check.json" and args.device == "cuda" and args.batch_sizes == [1, 8]
    assert gpu_check.parse_args(["--device", "cuda:1", "--batch-sizes", "2,4"]).batch_sizes == [2, 4]
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args([]).out is None
    for bad in (["--device", "tpu"], ["--batch-sizes", "one"], ["--batch-sizes", "0"]):
        with pytest.raises(SystemExit) as error:
            gpu_check.parse_args(bad)
        assert error.value.code == 2


def test_table_shows_measurements_and_failures(gpu_check):
    run = gpu_check.Run(gpu_check.parse_args(["--device", "cpu", "--dry-run"]))
    run.rows = [
        gpu_check.Row(
            "tensorrt-fp32",
            "tensorrt",
            "fp32",
            "cuda",
            status="ran",
            mean_cosine=0.999912,
            min_cosine=0.99871,
            top1=1.0,
            gate_passed=True,
            latency={"1": {"p50_ms": 3.25, "items_per_s": 307.7}, "8": {"p50_ms": 12.5, "items_per_s": 640.0}},
        ),
        gpu_check.Row(
            "onnxruntime-cuda-fp32", "onnxruntime", "fp32", "cuda", status="failed", reason="ProviderError: x"
        ),
    ]
    text = gpu_check.table(run)
    assert "0.99991" in text and "3.25" in text and "640.0" in text and "yes" in text
    assert "onnxruntime-cuda-fp32: failed: ProviderError: x" in text
    assert run.to_dict()["failed"] == ["onnxruntime-cuda-fp32"] and not run.to_dict()["passed"]


def test_latency_arithmetic(gpu_check):
    calls = []
    result = gpu_check.latency(lambda items: calls.append(len(items)), ["a", "b", "c"], batch=8, warmup=2, iters=5)
    assert calls == [8] * 7  # the three patches repeated to fill the batch
    assert result["iters"] == 5 and result["p50_ms"] >= 0 and result["items_per_s"] > 0
