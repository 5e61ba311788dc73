"""The fallback's end-to-end ranking: simulated candidates (the best candidate's quantization as Q/DQ in float, one op
more in float), ordered by what the measure says; graphs an op does not touch reach the judge as the same objects,
and the judge's staging then neither writes nor hashes them again."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx_graphs import float_input, make_model, run

from pue.calibration.graph_ops import weight_ops
from pue.calibration.measured_ranking import Candidate, rank_end_to_end, simulate, static_ranges, worst_items
from pue.calibration.staging import Staged, write_graphs
from pue.calibration.stats import collect_channel_stats


def two_graphs() -> dict:
    rng = np.random.default_rng(0)
    models = {}
    for name, layers in (("vision", 2), ("decoder", 3)):
        models[name] = make_model(
            [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"], name=f"{name}{i}") for i in range(layers)],
            [float_input(f"x{i}", ["rows", 8]) for i in range(layers)],
            [f"y{i}" for i in range(layers)],
            {f"w{i}": rng.normal(size=(8, 4)).astype(np.float32) for i in range(layers)},
        )
    return models


def feeds(layers: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{f"x{i}": rng.normal(size=(6, 8)).astype(np.float32) for i in range(layers)} for _ in range(2)]


def setting() -> tuple[dict, list, Candidate]:
    models = two_graphs()
    ops, stats = [], {}
    for name, layers in (("vision", 2), ("decoder", 3)):
        graph_ops = weight_ops(models[name], name)
        ops += graph_ops
        stats.update(collect_channel_stats(models[name], graph_ops, feeds(layers)))
    candidate = Candidate(frozenset({"decoder2"}), frozenset(), static_ranges(ops, stats, None), "u8", 64)
    return models, ops, candidate


def test_simulated_graphs_carry_the_candidates_quantization_and_one_more_float_op():
    models, ops, candidate = setting()
    assert candidate.ranges["x0"][0] < 0 < candidate.ranges["x0"][1]  # MinMax from the statistics
    graphs = simulate(models, ops, candidate, {"vision0"})
    feed = feeds(3)[0]
    exact, simulated = run(models["decoder"], feed), run(graphs["decoder"], feed)
    assert np.array_equal(simulated[2], exact[2])  # decoder2: float in the candidate
    assert not np.array_equal(simulated[0], exact[0]) and np.allclose(simulated[0], exact[0], atol=0.1)
    vision = run(graphs["vision"], feeds(2)[0])
    assert np.array_equal(vision[0], run(models["vision"], feeds(2)[0])[0])  # vision0: the extra float op
    assert not np.array_equal(vision[1], run(models["vision"], feeds(2)[0])[1])


def test_ranking_orders_by_the_measure_and_passes_untouched_graphs_as_the_same_objects():
    models, ops, candidate = setting()
    shown: list[dict] = []

    def measure(graphs):
        shown.append(graphs)
        floated = {
            n.name
            for g in graphs.values()
            for n in g.graph.node
            if n.op_type == "MatMul" and "pue_fq" not in n.input[0]
        }
        return 0.999, (0.99 if "decoder1" in floated else 0.95 if "vision1" in floated else 0.9)

    ranked = rank_end_to_end(models, ops, candidate, ["decoder0", "vision1", "decoder1", "vision0"], measure)
    assert [r["node"] for r in ranked[:2]] == ["decoder1", "vision1"]
    assert ranked[0]["min_gain"] == pytest.approx(0.09) and ranked[0]["graph"] == "decoder"
    base = shown[0]
    assert len(shown) == 5  # the candidate itself, then one per op
    for graphs, node in zip(shown[1:], ["vision1", "vision0", "decoder0", "decoder1"], strict=True):  # by graph
        other = "decoder" if node.startswith("vision") else "vision"
        assert graphs[other] is base[other] and graphs[node[:-1]] is not base[node[:-1]]
    assert worst_items([0.5, 0.9, 0.1, 0.7], 2) == [0, 2]


def test_staging_writes_a_graph_again_only_when_it_changed(tmp_path):
    models = two_graphs()
    staged = Staged()
    write_graphs(models, tmp_path, staged)
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    changed = dict(models, decoder=two_graphs()["decoder"])
    written = write_graphs(changed, tmp_path, staged)
    assert written == {"vision": ("vision.onnx", []), "decoder": ("decoder.onnx", [])}
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert after["vision.onnx"] == first["vision.onnx"] and staged.models["decoder"] is changed["decoder"]
    staged.clear()  # a real candidate was staged in between: everything is written again
    write_graphs(changed, tmp_path, staged)
    assert staged.models["vision"] is models["vision"] and set(staged.written) == {"vision", "decoder"}


def test_a_simulated_graph_holds_each_weight_once_and_a_tied_weight_stays_float_for_its_float_reader():
    """The ranking holds the float graphs and a simulated copy of each: the copy's quantized weights replace the float
    ones (measured on the Qwen3-VL-2B-shaped bench preset: keeping both made each simulated graph twice the float
    one's size). A weight two MatMuls read, one of them kept float, keeps its float value for that one."""
    models, ops, candidate = setting()
    graphs = simulate(models, ops, candidate)
    for name, model in models.items():
        before = sum(len(init.raw_data) for init in model.graph.initializer)
        after = sum(len(init.raw_data) for init in graphs[name].graph.initializer)
        assert {i.name for i in model.graph.initializer} <= {i.name for i in graphs[name].graph.initializer}
        assert before <= after < before + 64  # the quantized weights under their own names, plus a few constants
    rng = np.random.default_rng(2)
    tied = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="q"),
            helper.make_node("MatMul", ["x", "w"], ["z"], name="f"),
        ],
        [float_input("x", ["rows", 8])],
        ["y", "z"],
        {"w": rng.normal(size=(8, 4)).astype(np.float32)},
    )
    tied_ops = weight_ops(tied, "vision")
    stats = collect_channel_stats(tied, tied_ops, [{"x": rng.normal(size=(6, 8)).astype(np.float32)}])
    both = Candidate(frozenset({"f"}), frozenset(), static_ranges(tied_ops, stats, None), "u8", 64)
    simulated = simulate({"vision": tied}, tied_ops, both)["vision"]
    feed = {"x": rng.normal(size=(3, 8)).astype(np.float32)}
    exact, out = run(tied, feed), run(simulated, feed)
    assert np.array_equal(out[1], exact[1]) and not np.array_equal(out[0], exact[0])


def test_a_weightless_graph_and_its_data_folder_simulate_like_the_loaded_graph(tmp_path):
    """The search ranks from the float graphs' files: loaded without their external data, each simulated graph reads
    its weights from the folder once; it computes what the simulation of the loaded graph computes."""
    import onnx

    models, ops, candidate = setting()
    weightless = {}
    for name, model in models.items():
        path = tmp_path / f"{name}.float.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{name}.float.data", size_threshold=0)
        weightless[name] = onnx.load(str(path), load_external_data=False)
        assert all(init.external_data and not init.raw_data for init in weightless[name].graph.initializer)
    from_files = simulate(weightless, ops, candidate, {"vision0"}, base_dir=tmp_path)
    loaded = simulate(two_graphs(), ops, candidate, {"vision0"})
    for name, layers in (("vision", 2), ("decoder", 3)):
        assert not any(init.external_data for init in from_files[name].graph.initializer)
        for got, want in zip(run(from_files[name], feeds(layers)[0]), run(loaded[name], feeds(layers)[0]), strict=True):
            assert np.array_equal(got, want)
