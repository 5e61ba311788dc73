"""The latency worker: spec parsing, batch cycling, its result lines, and how the parent reads a failure."""

from __future__ import annotations

import json

import pytest

from pue.benchmarks.latency import parse_worker_output, run_worker_process
from pue.benchmarks.latency_rows import rows_from_outcome
from pue.benchmarks.latency_worker import (
    BATCH_PREFIX,
    LOADED_PREFIX,
    WorkerSpec,
    batch_of,
    main,
    parse_spec,
    rows_of,
    run_worker,
)
from pue.data import patch_set
from pue.errors import PueError


def _spec(**changes):
    data = {
        "kind": "bundle",
        "path": "/nowhere",
        "images": ["a.jpg", "b.jpg", "c.jpg"],
        "batch_sizes": [1, 2],
        "warmup": 1,
        "iters": 2,
    }
    data.update(changes)
    return data


def test_parse_spec_round_trip():
    spec = parse_spec(json.dumps(_spec(threads=2, device="cpu")))
    assert spec.kind == "bundle" and spec.batch_sizes == [1, 2] and spec.threads == 2
    assert parse_spec(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "tensorflow"}, "kind must be one of"),
        ({"images": []}, "images must be"),
        ({"batch_sizes": [0]}, "batch_sizes"),
        ({"batch_sizes": [True]}, "batch_sizes"),
        ({"iters": 0}, "iters"),
        ({"warmup": -1}, "warmup"),
        ({"threads": 0}, "threads"),
        ({"images_per_row": 0}, "images_per_row"),
        ({"kind": "reference", "dtype": "int8"}, "dtype"),
        ({"colour": "blue"}, "unknown"),
    ],
)
def test_bad_specs_are_refused(changes, message):
    with pytest.raises(PueError, match=message):
        parse_spec(json.dumps(_spec(**changes)))


def test_bad_json_and_missing_fields():
    with pytest.raises(PueError, match="not valid JSON"):
        parse_spec("{kind: bundle")
    with pytest.raises(PueError, match="missing"):
        parse_spec(json.dumps({"kind": "bundle"}))
    assert main(["[]"]) == 1


def test_batches_cycle_through_the_images():
    images = ["a", "b", "c"]
    assert batch_of(images, 2, 0) == ["a", "b"]
    assert batch_of(images, 2, 1) == ["c", "a"]
    assert batch_of(images, 4, 0) == ["a", "b", "c", "a"]


def test_rows_of_several_images():
    assert rows_of(["a", "b", "c", "d"], 2) == [["a", "b"], ["c", "d"]]
    assert rows_of(["a", "b"], 1) == [["a"], ["b"]]


def test_multi_image_rows_in_process(fp32_bundle):
    """--images-per-row 4: a batch of 2 rows embeds 8 images, 4 per query."""
    images = [str(p) for p in patch_set("heldout")[:5]]
    spec = WorkerSpec.from_dict(_spec(path=str(fp32_bundle()), images=images, batch_sizes=[2], images_per_row=4))
    result = run_worker(spec, emit=lambda line: None)
    (batch,) = result["batches"]
    assert batch["batch_size"] == 2 and len(batch["latencies_ms"]) == 2


def test_run_worker_in_process(fp32_bundle):
    images = [str(p) for p in patch_set("heldout")[:3]]
    spec = WorkerSpec.from_dict(_spec(path=str(fp32_bundle()), images=images, batch_sizes=[2, 1]))
    lines: list[str] = []
    result = run_worker(spec, emit=lines.append)
    assert lines[0].startswith(LOADED_PREFIX) and all(line.startswith(BATCH_PREFIX) for line in lines[1:])
    outcome = parse_worker_output("noise from a library\n" + "\n".join(lines))
    assert outcome.loaded["precision"] == "fp32" and outcome.loaded["backend"] == "onnxruntime"
    assert [batch["batch_size"] for batch in outcome.batches] == [1, 2]  # ascending
    for batch in result["batches"]:
        assert len(batch["latencies_ms"]) == 2 and min(batch["latencies_ms"]) > 0
        assert batch["stage_ms"]["vision"] > 0 and batch["stage_ms"]["decoder"] > 0
        assert batch["peak_memory_mb"] > 10
    rows = rows_from_outcome("tiny", spec, outcome, "fp32", "onnxruntime")
    assert [row["batch_size"] for row in rows] == [1, 2] and not any(row.get("error") for row in rows)


def test_a_failing_worker_becomes_error_rows(tmp_path):
    spec = WorkerSpec.from_dict(_spec(path=str(tmp_path / "missing-bundle")))
    outcome = run_worker_process(spec)
    assert outcome.error is not None and "does not exist" in outcome.error
    rows = rows_from_outcome("missing", spec, outcome, "fp32", "onnxruntime")
    assert len(rows) == 2 and all("does not exist" in row["error"] and row["p50_ms"] is None for row in rows)


def test_partial_output_keeps_finished_batch_sizes():
    stdout = "\n".join(
        [
            LOADED_PREFIX + json.dumps({"precision": "fp32", "backend": "onnxruntime", "threads": None, "load_s": 1.0}),
            BATCH_PREFIX
            + json.dumps({"batch_size": 1, "latencies_ms": [10.0, 12.0], "stage_ms": {}, "peak_memory_mb": 100.0}),
        ]
    )
    outcome = parse_worker_output(stdout)
    outcome.error = "worker killed by signal 9 (SIGKILL: out of memory?)"
    spec = WorkerSpec.from_dict(_spec(batch_sizes=[1, 8]))
    rows = rows_from_outcome("big", spec, outcome, "fp32", "onnxruntime")
    assert rows[0].get("error") is None and rows[0]["p50_ms"] == pytest.approx(11.0)
    assert "signal 9" in rows[1]["error"] and rows[1]["items_per_s"] is None
