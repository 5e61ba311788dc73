"""GPTQ rounding of int8 weights: on the same grid as round-to-nearest, a smaller output error on tokens like the
calibration ones; applied to onnxruntime's static and dynamic graphs and to pue's per-token rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pue.calibration.gptq import gptq_levels, round_weights
from pue.calibration.graph_ops import weight_ops
from pue.calibration.int8 import quantize_dynamic_graph, quantize_static_graph
from pue.calibration.readers import OrtReader

K, N = 64, 32


def _tokens(count: int, seed: int) -> np.ndarray:
    """Activations on a low-dimensional subspace plus noise, as trained models' hidden states are."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((6, K))
    return (rng.standard_normal((count, 6)) @ basis + 0.2 * rng.standard_normal((count, K))).astype(np.float32)


def _weight() -> np.ndarray:
    return (0.1 * np.random.default_rng(7).standard_normal((K, N))).astype(np.float32)


def _relative_error(x: np.ndarray, weight: np.ndarray, rounded: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (weight - rounded)) / np.linalg.norm(x @ weight))


def test_gptq_keeps_the_grid_and_lowers_the_output_error_on_unseen_tokens():
    weight = _weight()
    scale = np.abs(weight).max(axis=0) / 127
    nearest = np.clip(np.round(weight / scale), -127, 127)
    levels = gptq_levels(weight, scale, [_tokens(1024, 0), _tokens(1024, 1)], 127)
    assert levels.dtype == np.int32 and np.abs(levels).max() <= 127
    assert (levels != nearest).any()
    held_out = _tokens(2048, 2)
    assert _relative_error(held_out, weight, levels * scale) < 0.6 * _relative_error(held_out, weight, nearest * scale)
    # a bound of 64 (7-bit weights, CPUs without VNNI) is kept too
    assert np.abs(gptq_levels(weight, np.abs(weight).max(axis=0) / 64, [_tokens(512, 0)], 64)).max() <= 64


def _graph(path: Path) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "tokens", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "tokens", N])],
        [numpy_helper.from_array(_weight(), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path))
    return model


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_onnxruntimes_int8_weights_are_re_rounded_in_place(tmp_path: Path, mode: str):
    model = _graph(tmp_path / "float.onnx")
    rows = [{"x": _tokens(64, seed)[None]} for seed in range(8)]
    out = tmp_path / "int8.onnx"
    if mode == "static":
        quantize_static_graph(tmp_path / "float.onnx", out, OrtReader(rows), ["proj"], "onnxruntime")
    else:
        quantize_dynamic_graph(tmp_path / "float.onnx", out, ["proj"])
    quantized = onnx.load(str(out))
    before = {i.name: numpy_helper.to_array(i).copy() for i in quantized.graph.initializer}
    held_out = _tokens(512, 50)[None]

    def error(graph: onnx.ModelProto) -> float:
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(["y"], {"x": held_out})[0]
        return float(np.linalg.norm(got - held_out @ _weight()) / np.linalg.norm(held_out @ _weight()))

    error_before = error(quantized)
    samples = {"proj": [row["x"][0] for row in rows]}
    cache: dict = {}
    done = round_weights(quantized, weight_ops(model, "decoder"), samples, lambda name: _weight(), cache)
    assert done == ["proj"] and len(cache) == 1
    after = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    assert np.array_equal(after["w_scale"], before["w_scale"])  # same grid
    assert not np.array_equal(after["w_quantized"], before["w_quantized"])
    bound = np.abs(before["w_quantized"].astype(int)).max()
    assert np.abs(after["w_quantized"].astype(int)).max() <= bound  # 64 here: onnxruntime's 7-bit weights
    assert error(quantized) < error_before


def test_the_search_tries_gptq_on_the_best_candidate_and_keeps_it_only_when_the_check_is_better(tmp_path):
    """int8-dynamic without massive tokens: per tensor (fails), every op per token (better, still failing), then GPTQ
    on that candidate — its per-token rows kept — taken only if the check says better."""
    from search_fakes import Verdict, search_decoder

    from pue.calibration.quantize_bundle import QuantizeOptions

    for better in (True, False):
        work = tmp_path / str(better)
        work.mkdir()
        model = _graph(work / "float.onnx")
        scores = iter([0.95, 0.97, 0.99 if better else 0.96])

        def check(quantized, scores=scores):
            minimum = next(scores, 0.99)
            return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

        options = QuantizeOptions(precision="int8-dynamic", smooth=False, fallback=False, gptq=True)
        rows = [{"x": _tokens(64, seed)[None]} for seed in range(4)]
        result = search_decoder(model, rows, work, options, check, check)
        attempts = result["attempts"]
        assert [a["weights"] for a in attempts] == ["nearest", "nearest", "gptq"]
        assert [a["per_token_nodes"] for a in attempts] == [[], ["proj"], ["proj"]]
        assert [a["taken"] for a in attempts] == [True, True, better]
        assert result["weights"]["rounding"] == ("gptq" if better else "nearest")
        assert result["weights"]["gptq_ops"] == (1 if better else 0)  # the per-token op's weights


def test_weight_reader_reads_one_weight_of_a_weightless_graph(tmp_path: Path):
    from pue.calibration.gptq import weight_reader

    model = _graph(tmp_path / "plain.onnx")
    onnx.save_model(model, str(tmp_path / "float.onnx"), save_as_external_data=True, size_threshold=0)
    weightless = onnx.load(str(tmp_path / "float.onnx"), load_external_data=False)
    assert not weightless.graph.initializer[0].raw_data  # its bytes lie in the external file
    np.testing.assert_array_equal(weight_reader(weightless, tmp_path)("w"), _weight())
