"""The bookkeeping of scripts/fidelity_matrix.py (the script quantizes for minutes; not run here): the `floor` mode
runs once per parent whatever the calibration sets, its row comes from `pue-export floor --json`, and the summary
counts parents' floors apart from quantized cells."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fidelity_matrix.py"


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("fidelity_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def args(**values: str) -> argparse.Namespace:
    base = {"modes": "floor,int8:tensorrt", "calibrations": "shipped,svs8", "rotate": "off", "methods": "on,off"}
    return argparse.Namespace(**(base | values))


def test_the_floor_runs_once_per_parent(matrix):
    runs = matrix.runs(args())
    assert [r for r in runs if r[0] == "floor"] == [("floor", "onnxruntime", "shipped", "off", "on")]
    assert len([r for r in runs if r[0] == "int8"]) == 4  # 2 calibration sets x methods on/off


def test_the_floor_row_reads_pue_export_floor_json(matrix, monkeypatch, tmp_path):
    record = {"passed": True, "verdict": "tight", "overall": {"mean_cosine": 0.999, "min_cosine": 0.9805, "top1": 1.0}}
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(record), stderr="")

    monkeypatch.setattr(matrix.subprocess, "run", fake_run)
    row = matrix.floor_row(tmp_path / "fp32")
    assert calls[0][1:] == ["-m", "pue.cli.export_app", "floor", str(tmp_path / "fp32"), "--json"]
    assert calls[0][0] == sys.executable
    assert row["passed"] and row["floor_verdict"] == "tight" and row["min_cosine"] == 0.9805
    assert matrix.floor(row) == "pass, tight 0.9805"

    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 2, stdout="", stderr="no such bundle")

    monkeypatch.setattr(matrix.subprocess, "run", failing_run)
    row = matrix.floor_row(tmp_path / "fp32")
    assert not row["passed"] and "no such bundle" in row["error"] and row["exit"] == 2


def test_the_summary_counts_floors_apart_from_cells(matrix):
    floor = {"precision": "floor", "passed": False, "floor_passed": False, "floor_verdict": "fails"}
    cell = {"precision": "int8", "passed": False, "floor_passed": True, "floor_verdict": "clear"}
    text = matrix.summary([floor, cell, {**floor, "floor_verdict": "clear", "passed": True}])
    assert "0 of 1 cells pass" in text and "1 one that passes it clearly" in text
    assert "Parents' floors (`pue-export floor`): 1 clear, 0 tight, 1 fail." in text
    assert matrix.summary([floor]).strip() == "Parents' floors (`pue-export floor`): 0 clear, 0 tight, 1 fail."
