"""Static INT8 activation ranges chosen by output error (issue 14, item 4): the clip that minimises a MatMul's output
error is chosen per tensor, a massive token the weights read keeps MinMax, onnxruntime's quantizer writes exactly the
ranges it is given, and the search takes the error-chosen ranges only when the calibration check says they are
better."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx_graphs import float_input, make_model
from search_fakes import Verdict, search_decoder

from pue.calibration.graph_ops import weight_ops
from pue.calibration.int8 import quantize_static_graph
from pue.calibration.quantize_bundle import QuantizeOptions
from pue.calibration.ranges import minmax_ranges, mse_ranges
from pue.calibration.readers import OrtReader
from pue.calibration.stats import collect_channel_stats

K, N = 16, 8


def one_matmul(weight: np.ndarray) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [float_input("x", ["rows", K])],
        ["y"],
        {"w": weight},
    )


def feeds(spike_channel_weight: float, count: int = 4) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """Gaussian rows with one token per row at 50× on channel 0; channel 0's weight row scaled by the argument."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    weight[0] *= spike_channel_weight
    rows = []
    for _ in range(count):
        x = rng.normal(size=(64, K)).astype(np.float32)
        x[5, 0] = 50.0
        rows.append({"x": x})
    return one_matmul(weight), rows


def ranges_of(model, rows, scheme="s8"):
    ops = weight_ops(model, "decoder")
    stats = collect_channel_stats(model, ops, rows)
    return ops, stats, mse_ranges(model, ops, stats, scheme)


def test_a_spike_the_weights_ignore_is_clipped_one_they_read_is_kept():
    model, rows = feeds(spike_channel_weight=0.0)  # the spike's channel carries no weight: clipping it costs nothing
    ops, stats, (ranges, clips) = ranges_of(model, rows)
    assert minmax_ranges(ops, stats)["x"][1] == 50.0
    assert clips["x"] < 0.3 and ranges["x"][1] == 50.0 * clips["x"]
    model, rows = feeds(spike_channel_weight=1.0)  # a massive token the op reads: saturating it would be the error
    _, stats, (ranges, clips) = ranges_of(model, rows)
    assert clips["x"] == 1.0 and ranges["x"][1] == 50.0
    assert all(len(peak) == 4 and peak[:, 0].max() == 50.0 for peak in stats["x"].peaks)  # the spike is in the sample


def test_the_quantizer_writes_the_given_ranges(tmp_path):
    model, rows = feeds(spike_channel_weight=0.0)
    onnx.save(model, tmp_path / "f.onnx")
    for target, expected_scale in (("tensorrt", 10.0 / 127), ("onnxruntime", 12.0 / 255)):
        quantize_static_graph(
            tmp_path / "f.onnx", tmp_path / "q.onnx", OrtReader(rows[:1]), ["mm"], target, ranges={"x": (-2.0, 10.0)}
        )
        q = onnx.load(tmp_path / "q.onnx")
        quantize = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
        scale = next(i for i in q.graph.initializer if i.name == quantize.input[1])
        assert numpy_helper.to_array(scale) == np.float32(expected_scale)


def test_with_every_range_given_the_calibrator_reads_one_row_whatever_other_graphs_ranges_come_along(tmp_path):
    """The search hands each graph the ranges of both graphs; those of the other graph do not count, so the
    calibrator still reads one row (before, it read every row: on `bench` the several-image rows' attention, 14.8 GB).
    Without a range for the op's input it reads them all."""

    class Counting(OrtReader):
        read = 0

        def get_next(self):
            row = super().get_next()
            Counting.read += row is not None
            return row

    model, rows = feeds(spike_channel_weight=0.0)
    onnx.save(model, tmp_path / "f.onnx")
    for ranges, expected in (({"x": (-2.0, 10.0), "vision_input": (0.0, 1.0)}, 1), ({"vision_input": (0.0, 1.0)}, 4)):
        Counting.read = 0
        reader = Counting(rows[:4])
        quantize_static_graph(tmp_path / "f.onnx", tmp_path / "q.onnx", reader, ["mm"], "tensorrt", ranges=ranges)
        assert Counting.read == expected


def activation_scale(quantized: dict) -> float:
    graph = quantized["decoder"].graph
    quantize = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    return float(numpy_helper.to_array(next(i for i in graph.initializer if i.name == quantize.input[1])))


def run_search(tmp_path, mse_minimum: float) -> tuple[dict, list[float]]:
    """The spike-ignoring graph: MinMax scores a minimum of 0.95, the error-chosen ranges `mse_minimum`."""
    tmp_path.mkdir()
    model, rows = feeds(spike_channel_weight=0.0)
    minmax_scale = 50.0 / 127
    scales: list[float] = []

    def check(quantized):
        scales.append(activation_scale(quantized))
        minimum = 0.95 if np.isclose(scales[-1], minmax_scale) else mse_minimum
        return Verdict(False, {"mean_cosine": 0.99, "min_cosine": minimum, "top1": 1.0})

    options = QuantizeOptions(precision="int8", target="tensorrt", smooth=False, fallback=False, gptq=False)

    def gate(quantized):
        return Verdict(False, {"mean_cosine": 0.99, "min_cosine": 0.9, "top1": 1.0})

    result = search_decoder(model, rows, tmp_path, options, check, gate)
    assert len(scales) == 2 and np.isclose(scales[0], minmax_scale) and scales[1] < minmax_scale / 3
    return result, scales


def test_the_search_takes_error_chosen_ranges_only_when_the_check_is_better(tmp_path):
    result, _ = run_search(tmp_path / "better", mse_minimum=0.97)
    assert [a["ranges"] for a in result["attempts"]] == ["minmax", "mse"]
    assert [a["taken"] for a in result["attempts"]] == [True, True]
    assert result["ranges"]["rule"] == "mse" and 0 < result["ranges"]["clipped"]["x"] < 0.3
    result, _ = run_search(tmp_path / "worse", mse_minimum=0.94)  # lowers the minimum: never taken
    assert [a["taken"] for a in result["attempts"]] == [True, False]
    assert result["ranges"] == {"rule": "minmax", "clipped": {}, "mse_would_clip": 1}


def test_the_fidelity_plot_says_what_was_done_to_the_groups():
    from pue.calibration.fidelity_plot import treatment_line

    report = {
        "int8_flop_share": 0.9,
        "float_nodes": ["conv"],
        "per_token_nodes": [],
        "smoothed": [{"fold": "v_proj"}, {"fold": "mul"}],
        "ranges": {"rule": "mse", "clipped": {"x": 0.5}},
        "rotation": {"applied": False},
    }
    assert treatment_line(report) == (
        "1 ops float; 0 per token; 2 groups smoothed (1 folded exactly); ranges mse (1 clipped); not rotated"
    )
    assert treatment_line({"int8_flop_share": None}) == ""  # fp16: no INT8 search
