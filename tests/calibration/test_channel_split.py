"""The residual channels that later norm gains amplify, written in float by every writer (`channel_split`): found from
the gains, exact in FP32, never quantized, and what they change in an INT8 graph."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import numpy_helper
from onnx_graphs import run
from test_rotation import INNER, SEQ, VOCAB, toy_decoder

from pue.calibration.channel_split import (
    PREFIX,
    amplified_channels,
    read_float_inputs,
    split_reader_rows,
    split_writer_columns,
)
from pue.calibration.graph_ops import weight_ops
from pue.calibration.int8 import quantize_dynamic_graph, quantize_static_graph
from pue.calibration.readers import OrtReader


def test_amplified_channels_come_from_the_stream_norms_gains():
    model, _ = toy_decoder(8)
    channels, ratios = amplified_channels(model)
    assert channels == [1] and ratios[0] >= 20  # toy_decoder's gain of 100 on channel 1 of the first norm
    assert amplified_channels(model, ratio=1000.0) == ([], [])


def test_the_split_keeps_the_function_and_adds_no_weight_op():
    model, feed = toy_decoder(8)
    split = copy.deepcopy(model)
    done = split_writer_columns(split)
    assert sorted(done.writers) == ["down_proj", "o_proj"] and done.channels == [1]
    assert done.split_flops == 2 * 1 * ((INNER + 8) + (INNER + 8))  # 2·|C|·(K + N) per token, o_proj and down_proj
    np.testing.assert_allclose(run(split, feed)[0], run(model, feed)[0], rtol=1e-6, atol=1e-6)
    # the side products are Constants, not weight initializers: the INT8 search never quantizes them
    assert [op.node for op in weight_ops(split, "decoder")] == [op.node for op in weight_ops(model, "decoder")]
    sides = [n for n in split.graph.node if n.name in done.side_nodes]
    writers = {n.name: n for n in split.graph.node if n.name in done.writers}
    assert {side.input[0] for side in sides} == {w.input[0] for w in writers.values()}  # the writers' own inputs


def test_nothing_is_split_without_amplified_channels():
    model, _ = toy_decoder(8)
    done = split_writer_columns(model, ([], []))
    assert not done.writers and "no residual channel" in done.why_not
    assert not any(n.name.startswith(PREFIX) for n in model.graph.node)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_in_int8_the_amplified_columns_are_the_float_ones(tmp_path, mode):
    """onnxruntime's static Q/DQ rewires every reader of a quantized input to its DequantizeLinear; `read_float_inputs`
    gives the side products the float input back (its dynamic MatMulInteger leaves them the float input), so the
    amplified columns of each writer's output are exactly float, the others int8 as before."""
    import onnx

    model, feed = toy_decoder(8)
    split = copy.deepcopy(model)
    done = split_writer_columns(split)
    onnx.save_model(split, str(tmp_path / "split.onnx"))
    rows = _feeds(4)
    if mode == "static":
        quantize_static_graph(
            tmp_path / "split.onnx", tmp_path / "int8.onnx", OrtReader(rows), done.writers, "onnxruntime"
        )
    else:
        quantize_dynamic_graph(tmp_path / "split.onnx", tmp_path / "int8.onnx", done.writers)
    quantized = onnx.load(str(tmp_path / "int8.onnx"))
    # static: both side products had been rewired to Q/DQ; dynamic: they read the float input already
    assert read_float_inputs(quantized, done.side_nodes) == (2 if mode == "static" else 0)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for writer in (n for n in model.graph.node if n.name in done.writers):
        x, written = writer.input[0], writer.output[0]  # the float input (what Q reads) and the corrected output
        index = done.writers.index(writer.name)
        int8_product = f"{PREFIX}{index}_int8_output"
        got_x, got_written, got_int8 = run(quantized, feed, [x, written, int8_product])
        exact = got_x @ weights[writer.input[1]][:, done.channels]
        np.testing.assert_allclose(got_written[..., done.channels], exact, rtol=1e-5, atol=1e-5)
        assert not np.allclose(got_int8[..., done.channels], exact, atol=1e-4)  # what int8 alone would have written
        others = [c for c in range(got_written.shape[-1]) if c not in done.channels]
        np.testing.assert_array_equal(got_written[..., others], got_int8[..., others])  # the rest: int8 as before


def _feeds(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "input_ids": rng.integers(0, VOCAB, size=(2, SEQ)).astype(np.int64),
            "is_image": rng.random((2, SEQ, 1)) < 0.5,
            "image_features": (rng.normal(size=(2, SEQ, 8)) * 3).astype(np.float32),
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize("better", [True, False])
def test_the_search_tries_the_split_and_keeps_it_only_when_the_check_is_better(tmp_path, better):
    """Static INT8 on a decoder with an amplified channel: everything int8 (fails), then the writers' amplified
    columns in float, then the readers' amplified rows as well, each taken only if the calibration check says
    better; `--no-split-channels` tries neither."""
    from search_fakes import Verdict, search_decoder

    from pue.calibration.quantize_bundle import QuantizeOptions

    def check(quantized):
        split = any(n.name.startswith(PREFIX) for n in quantized["decoder"].graph.node)
        readers = any(n.name.startswith(PREFIX + "r") for n in quantized["decoder"].graph.node)
        minimum = 0.93 if readers else (0.99 if better else 0.90) if split else 0.95
        return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

    options = dict(
        precision="int8",
        smooth=False,
        fallback=False,
        error_ranges=False,
        gptq=False,
        wide_weights=False,
        per_token=False,
    )
    model, _ = toy_decoder(8)
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    result = search_decoder(model, _feeds(4), tmp_path / "on", QuantizeOptions(**options), check, check)
    # then the readers' rows too (the fake check scores them worse than the best: not taken)
    assert [a["channel_split"] for a in result["attempts"]] == [False, True, True]
    assert [a["reader_split"] for a in result["attempts"]] == [False, False, True]
    assert [a["taken"] for a in result["attempts"]] == [True, better, False]
    assert result["channel_split"]["taken"] is better and result["channel_split"]["readers_taken"] is False
    assert sorted(result["channel_split"]["reader_graphs"]["decoder"]["readers"]) == ["k_proj", "q_proj", "up_proj"]
    assert sorted(result["channel_split"]["graphs"]["decoder"]["writers"]) == ["down_proj", "o_proj"]
    off = QuantizeOptions(**options, split_channels=False)
    model, _ = toy_decoder(8)
    result = search_decoder(model, _feeds(4), tmp_path / "off", off, check, check)
    assert [a["channel_split"] for a in result["attempts"]] == [False] and result["channel_split"] is None


def test_writers_are_found_past_sources_the_rotation_cannot_fold():
    """A stream fed by a split graph input as well (Qwen3-VL's DeepStack features, added after the first layers):
    the rotation refuses such a stream, the split still finds every writer and names the other sources."""
    from onnx import TensorProto, helper

    model, _ = toy_decoder(8)
    graph = model.graph
    residual = next(n for n in graph.node if n.name == "residual1")
    residual.output[0] = "h1_plain"
    graph.input.append(helper.make_tensor_value_info("deepstack", TensorProto.FLOAT, [2, SEQ, 16]))
    graph.initializer.append(numpy_helper.from_array(np.array([8, 8], np.int64), "halves"))
    position = list(graph.node).index(residual) + 1
    graph.node.insert(position, helper.make_node("Split", ["deepstack", "halves"], ["deep0", "deep1"], axis=-1))
    graph.node.insert(position + 1, helper.make_node("Add", ["h1_plain", "deep0"], ["h1"], name="deepstack_add"))
    done = split_writer_columns(model)
    assert sorted(done.writers) == ["down_proj", "o_proj"]
    assert any(source.startswith("Split") for source in done.other_sources)
    assert any(source.startswith("Gather") for source in done.other_sources)  # the token embedding


def test_inspect_names_the_split_channels_and_writers_only_when_taken():
    from pue.export.inspect_bundle import _treatment

    graphs = {"decoder": {"channels": [1, 5], "writers": ["o_proj", "down_proj"], "side_nodes": [], "split_flops": 8}}
    report = {"float_nodes": [], "channel_split": {"taken": True, "graphs": graphs}}
    split = {"channels": [1, 5], "writers": ["o_proj", "down_proj"], "readers": []}
    assert _treatment(report)["channel_split"] == {"decoder": split}
    report["channel_split"]["reader_graphs"] = {"decoder": {"channels": [1, 5], "readers": ["q_proj", "up_proj"]}}
    assert _treatment(report)["channel_split"] == {"decoder": split}  # the readers' variant not taken
    report["channel_split"]["readers_taken"] = True
    assert _treatment(report)["channel_split"] == {"decoder": dict(split, readers=["q_proj", "up_proj"])}
    report["channel_split"]["taken"] = False
    assert _treatment(report)["channel_split"] == {}
    assert _treatment({"float_nodes": []})["channel_split"] == {}  # bundles made before the split existed


def test_the_readers_split_keeps_the_function_and_takes_the_amplified_rows_out_of_the_int8_product(tmp_path):
    """q/k/v and gate/up read the amplified channels through a mask and zeroed weight rows (their int8 input range
    and weight steps then ignore them) and add those rows' float product; both splits together are exact in FP32, and
    in static INT8 the masked input is what gets quantized while the side product reads the float input."""
    import onnx

    model, feed = toy_decoder(8)
    split = copy.deepcopy(model)
    split_writer_columns(split)
    done = split_reader_rows(split, [1])
    assert sorted(done.readers) == ["k_proj", "q_proj", "up_proj"]  # the toy decoder's readers of its norms
    widths = {op.node: op.weight_shape[1] for op in weight_ops(model, "decoder")}
    assert len(done.masked) == 3 and done.split_flops == sum(2 * 1 * widths[r] for r in done.readers)  # 2·|C|·N
    np.testing.assert_allclose(run(split, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
    assert [op.node for op in weight_ops(split, "decoder")] == [op.node for op in weight_ops(model, "decoder")]
    for op in weight_ops(split, "decoder"):
        if op.node in done.readers:
            weight = numpy_helper.to_array(next(i for i in split.graph.initializer if i.name == op.weight))
            assert not weight[1].any()  # the amplified row left the int8 weight
    onnx.save_model(split, str(tmp_path / "split.onnx"))
    rows = _feeds(4)
    quantize_static_graph(tmp_path / "split.onnx", tmp_path / "int8.onnx", OrtReader(rows), done.readers, "onnxruntime")
    quantized = onnx.load(str(tmp_path / "int8.onnx"))
    producers = {out: n for n in quantized.graph.node for out in n.output}
    for node in quantized.graph.node:
        if node.name.endswith("_gather") and node.name.startswith(PREFIX + "r"):
            assert producers[node.input[0]].op_type != "DequantizeLinear"  # the side rows stay float
    assert run(quantized, feed)[0].shape == run(model, feed)[0].shape


def test_no_reader_is_split_without_channels():
    model, _ = toy_decoder(8)
    done = split_reader_rows(model, [])
    assert not done.readers and done.why_not
