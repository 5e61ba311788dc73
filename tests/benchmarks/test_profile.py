"""`pue-bench profile`: per-op-type kernel time of each graph, warm-up runs left out, sums that add up."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pue.benchmarks.profile import profile_bundle, summarize
from pue.cli.bench_app import app
from pue.errors import PueError


def _event(cat, name, ts, dur, op=None):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"op_name": op} if op else {}}


def test_summarize_counts_only_the_profiled_runs():
    events = [
        _event("Session", "model_run", 0, 100),  # warm-up
        _event("Node", "a_kernel_time", 1, 50, "MatMul"),
        _event("Session", "model_run", 200, 100),
        _event("Node", "a_kernel_time", 201, 30, "MatMul"),
        _event("Node", "b_kernel_time", 240, 10, "Softmax"),
        _event("Node", "b_fence_before", 239, 5, "Softmax"),  # not a kernel time
        _event("Session", "model_run", 400, 100),
        _event("Node", "a_kernel_time", 401, 34, "MatMul"),
        _event("Node", "b_kernel_time", 440, 6, "Softmax"),
    ]
    out = summarize(events, runs=2)
    assert out["kernel_ms"] == pytest.approx(0.040)  # (30 + 10 + 34 + 6) µs over 2 runs
    assert [op["op_type"] for op in out["ops"]] == ["MatMul", "Softmax"]
    assert out["ops"][0]["ms"] == pytest.approx(0.032) and out["ops"][0]["nodes"] == 1
    assert out["ops"][0]["share"] == pytest.approx(0.8)
    with pytest.raises(PueError, match="holds 3 runs"):
        summarize(events, runs=4)


def test_profile_of_a_bundle(fp32_bundle, tmp_path):
    bundle = fp32_bundle("llava_next", "ci")
    result = profile_bundle(bundle, batch_size=2)
    assert set(result["graphs"]) == {"vision", "decoder"} and result["batch_size"] == 2
    for graph in result["graphs"].values():
        assert graph["wall_ms"] > 0 and graph["kernel_ms"] > 0
        assert sum(op["share"] for op in graph["ops"]) == pytest.approx(1.0)
    assert "Softmax" in {op["op_type"] for op in result["graphs"]["decoder"]["ops"]}

    out = tmp_path / "profile.json"
    runner = CliRunner()
    done = runner.invoke(app, ["profile", str(bundle), "--batch-size", "1", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert json.loads(out.read_text())["graphs"]["vision"]["ops"]
    again = runner.invoke(app, ["profile", str(bundle), "-o", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    with pytest.raises(PueError, match="at least 1"):
        profile_bundle(bundle, batch_size=0)


def test_openvino_profile_sums_per_layer_counters_per_op_type():
    from pue.benchmarks.profile import summarize_openvino

    def layer(node_type, us, status="EXECUTED", kernel="brgemm_avx2_f32"):
        return {"node": "n", "node_type": node_type, "exec_type": kernel, "status": status, "real_time_us": us}

    runs = [
        [layer("FullyConnected", 300), layer("Subgraph", 100, kernel="jit_avx2_f32"), layer("Reshape", 0, "NOT_RUN")],
        [layer("FullyConnected", 500, kernel="gemm_mlas_f32"), layer("Subgraph", 100, kernel="jit_avx2_f32")],
    ]
    summary = summarize_openvino(runs)
    assert summary["kernel_ms"] == pytest.approx(0.5)
    first = summary["ops"][0]
    assert (first["op_type"], first["ms"], first["share"], first["nodes"]) == ("FullyConnected", 0.4, 0.8, 1)
    assert first["kernels"] == ["brgemm_avx2_f32", "gemm_mlas_f32"]
    assert [op["op_type"] for op in summary["ops"]] == ["FullyConnected", "Subgraph"]  # not-run layers left out
    assert summary["matmuls"] == {
        "ms": 0.4,
        "int8_ms": 0.0,
        "int8_share": 0.0,
        "layers": 1,
        "int8_layers": 0,
        "compressed_layers": 0,
    }
    quantized = summarize_openvino(
        [
            [
                layer("FullyConnected", 300, kernel="brgemm_avx2_I8"),
                layer("FullyConnected", 100),
                layer("Reshape", 50, kernel="unknown_I8"),
            ]
        ]
    )
    assert quantized["matmuls"] == {
        "ms": 0.4,
        "int8_ms": 0.3,
        "int8_share": 0.75,
        "layers": 2,
        "int8_layers": 1,
        "compressed_layers": 0,
    }
    assert {op["op_type"]: op["int8_ms"] for op in quantized["ops"]} == {"FullyConnected": 0.3, "Reshape": 0.05}
    # int8 weights alone (OpenVINO's run-time INT8): matmul layers, counted as compressed, whose kernel reads f32
    compressed = summarize_openvino([[layer("FullyConnectedCompressed", 200, kernel="brgemm_avx512_f32")]])
    assert compressed["matmuls"]["layers"] == 1 and compressed["matmuls"]["compressed_layers"] == 1
    with pytest.raises(PueError, match="no profiler for backend 'tensorrt'"):
        profile_bundle("unused", backend="tensorrt")
