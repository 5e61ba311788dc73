"""The sensitivity search on a small graph with fake judges: layers ranked worst SQNR first (or measured end to end,
where the judges can), the float set doubling (1, 2, 4, ...) while the calibration check fails, its last step as
many as the 80 % rule allows, a step that lowers the check's minimum never taken, and the held-out gate run once on
the chosen one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx_graphs import float_input, make_model
from search_harness import (
    BAD,
    GOOD,
    GRAPH_ORDER,
    K,
    Verdict,
    calibration_feeds,
    float_matmuls,
    parallel_matmuls,
    search,
    simulated_float,
)

from pue.calibration.graph_ops import int8_flop_share, weight_ops
from pue.calibration.int8 import rank_sensitivity
from pue.calibration.int8_search import MIN_INT8_FLOP_SHARE, Judges, search_int8
from pue.calibration.quantize_bundle import QuantizeOptions
from pue.calibration.simulate import matmul_sqnr
from pue.calibration.stats import collect_channel_stats
from pue.fidelity import Check, GateReport


def test_flops_and_int8_share_by_hand():
    model = parallel_matmuls()
    ops = weight_ops(model, "decoder")
    assert [op.flops_per_token for op in ops] == [16 if op.node in BAD else 256 for op in ops]
    assert sorted(op.flops_per_token for op in ops) == [16] * 4 + [256] * 6
    total = 4 * 16 + 6 * 256
    assert int8_flop_share(ops, set(), {"decoder": 1}) == 1.0
    assert int8_flop_share(ops, {"bad0", "good0"}, {"decoder": 1}) == pytest.approx(1 - (16 + 256) / total)
    # a second graph weighted by its tokens per patch: vision rows count 10×, decoder rows 3×
    gemm = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="proj", transB=1)],
        [float_input("x", [1, 4])],
        ["y"],
        {"w": np.zeros((6, 4), np.float32)},  # transB: 4 inputs → 6 outputs
    )
    vision = weight_ops(gemm, "vision")
    assert vision[0].weight_shape == (4, 6) and vision[0].in_channels == 4 and vision[0].flops_per_token == 48
    both = ops + vision
    share = int8_flop_share(both, {"proj"}, {"decoder": 3, "vision": 10})
    assert share == pytest.approx(3 * total / (3 * total + 10 * 48))
    assert int8_flop_share([], set(), {}) == 0.0


def test_rank_sensitivity_worst_first():
    model = parallel_matmuls()
    ops = weight_ops(model, "decoder")
    stats = collect_channel_stats(model, ops, calibration_feeds())
    del stats["x_good5"]  # an op without statistics is not ranked
    ranking = rank_sensitivity(model, ops, stats, "u8")
    assert [s["node"] for s in ranking[:4]] == list(BAD)  # larger outlier, coarser grid, lower SQNR
    assert {s["node"] for s in ranking[4:]} == set(GOOD) - {"good5"}
    sqnr = [s["sqnr_db"] for s in ranking]
    assert sqnr == sorted(sqnr) and len(set(sqnr[:5])) == 5  # no ties: the order is the SQNR's, not the graph's
    assert sqnr[3] < 30.0 < 35.0 < sqnr[4]  # a clean input loses little
    by_node = {s["node"]: s for s in ranking}
    channel = stats["x_bad2"]
    weight = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_bad2"))
    expected = matmul_sqnr(channel.samples, weight, float(channel.minimum.min()), float(channel.maximum.max()), "u8")
    assert by_node["bad2"]["sqnr_db"] == expected and by_node["bad2"]["graph"] == "decoder"
    assert by_node["bad0"]["outlier_ratio"] > 100


def test_float_set_doubles_worst_first_and_stops_at_the_80_percent_rule(tmp_path):
    result, seen, messages, gated = search(tmp_path)
    bad = list(BAD)
    fifth = result["ranking"][4]["node"]
    assert fifth in GOOD
    # 1, 2, 4; 8 would break the rule, so the last step keeps as many as fit: 5 (exactly 80 %)
    assert seen == [set(), set(bad[:1]), set(bad[:2]), set(bad[:4]), {*bad, fifth}]
    assert [a["float_nodes"] for a in result["attempts"]] == [sorted(s) for s in seen]
    total = 4 * 16 + 6 * 256
    assert [a["int8_flop_share"] for a in result["attempts"]] == pytest.approx(
        [1.0, 1 - 16 / total, 1 - 32 / total, 1 - 64 / total, 1 - 320 / total]
    )
    # the 8 worst: the four cheap layers and four expensive ones, (1024 + 64) / 1600 of the FLOPs in float
    assert int8_flop_share(weight_ops(parallel_matmuls(), "decoder"), set(bad + GOOD[:4]), {"decoder": 1}) < 0.8
    assert any("the fallback stops at 5 ops in float: one more would leave less than 80%" in m for m in messages)
    assert result["float_nodes"] == sorted([*bad, fifth]) and result["share"] == pytest.approx(1 - 320 / total)
    assert gated == [{*bad, fifth}]  # the held-out gate judged the chosen candidate, once
    assert [s["node"] for s in result["ranking"][:4]] == bad
    assert result["why"][-1].startswith(
        "no float fallback within the 80% int8 FLOP rule passes (the fallback stops at 5"
    )
    assert result["why"][0] == "mean cosine 0.9 < 0.995"
    assert all(a["int8_flop_share"] >= MIN_INT8_FLOP_SHARE for a in result["attempts"])
    assert result["measured_ranking"] == []  # these judges measure no simulated candidates: SQNR order


def test_the_fallback_follows_the_end_to_end_ranking_where_the_judges_measure_it(tmp_path):
    """good2 reads a clean input (SQNR ranks it after the four bad layers) but is what the embedding needs in float:
    the ranking judge, shown simulated candidates on the check's worst items, says so, and the fallback's first step
    keeps good2 in float, which passes. Each simulated candidate keeps in float what the best one does, plus one op
    of the SQNR ranking's shortlist."""
    measured: list[tuple[set[str], list[int]]] = []

    def rank(simulated, items):
        floated = simulated_float(simulated["decoder"])
        measured.append((floated, items))
        minimum = 0.99 if "good2" in floated else 0.8 + 0.001 * len(floated)
        return Verdict(passed=False, overall={"mean_cosine": 0.995, "min_cosine": minimum, "top1": 1.0})

    result, seen, messages, gated = search(tmp_path, passes_when=lambda floats: "good2" in floats, rank=rank)
    assert seen == [set(), {"good2"}] and gated == [{"good2"}] and result["fidelity"].passed
    assert measured[0][0] == set()  # the best candidate as it is
    assert sorted(set().union(*(m[0] for m in measured[1:]))) == sorted(GRAPH_ORDER)  # each op once (10 < 24)
    assert all(len(m[0]) == 1 for m in measured[1:]) and all(m[1] == [0, 1, 2] for m in measured)
    first = result["measured_ranking"][0]
    assert first["node"] == "good2" and first["min_cosine"] == 0.99 and first["min_gain"] == pytest.approx(0.19)
    assert [s["node"] for s in result["ranking"][:4]] == list(BAD)  # the SQNR ranking is still recorded
    assert any("fallback ranking: 10 ops measured end to end" in m and "best: good2" in m for m in messages)
    # --rank-ops 3: the SQNR ranking's worst three (the bad layers) are measured, good2 is not among them
    measured.clear()
    (tmp_path / "three").mkdir()
    result, seen, _, _ = search(tmp_path / "three", passes_when=lambda floats: "good2" in floats, rank=rank, rank_ops=3)
    assert [m[0] for m in measured[1:]] == [{"bad0"}, {"bad1"}, {"bad2"}] and "good2" not in set().union(*seen)


def massive_token_feeds() -> list[dict[str, np.ndarray]]:
    """The calibration feeds with one massive token (row 0, 1000×) at good3's input."""
    feeds = calibration_feeds()
    for feed in feeds:
        feed["x_good3"][0] *= 1000.0
    return feeds


def test_static_int8_tries_the_massive_token_readers_in_float_first(tmp_path):
    """Static INT8 has no per-token int8 kernel (OpenVINO, standard ONNX): once everything in int8 fails, the ops
    reading massive tokens (good3) are tried in float; the ranked fallback then adds its worst ops to them (never
    repeating them), within 80 %."""
    result, seen, messages, gated = search(tmp_path, target="openvino", feeds=massive_token_feeds)
    bad = list(BAD)
    assert seen == [set(), {"good3"}, {"good3", *bad[:1]}, {"good3", *bad[:2]}, {"good3", *bad[:4]}]
    assert any("token outliers: 1 ops read massive tokens" in m for m in messages)
    assert result["per_token_nodes"] == [] and gated == [{"good3", *bad}]
    assert result["share"] == pytest.approx(1 - (256 + 64) / (4 * 16 + 6 * 256))  # exactly 80 %: allowed
    # the first attempt passes: nothing is kept float for the massive tokens
    (tmp_path / "passes").mkdir()
    (tmp_path / "ort").mkdir()
    _, seen, _, _ = search(
        tmp_path / "passes", passes_when=lambda floats: True, target="openvino", feeds=massive_token_feeds
    )
    assert seen == [set()]
    # --no-fallback keeps nothing float, these ops included
    (tmp_path / "no-fallback").mkdir()
    _, seen, _, _ = search(tmp_path / "no-fallback", fallback=False, target="openvino", feeds=massive_token_feeds)
    assert seen == [set()]
    # onnxruntime's static INT8 takes the same step (its table entry says float too)
    _, seen, _, _ = search(tmp_path / "ort", feeds=massive_token_feeds)
    assert seen[:2] == [set(), {"good3"}]


def test_search_stops_at_the_first_candidate_that_passes(tmp_path):
    result, seen, _, gated = search(tmp_path, passes_when=lambda floats: {"bad0", "bad1"} <= floats)
    assert seen == [set(), {"bad0"}, {"bad0", "bad1"}]
    assert gated == [{"bad0", "bad1"}]
    assert result["fidelity"].passed and result["float_nodes"] == ["bad0", "bad1"] and result["why"] is None


def test_a_step_that_lowers_the_minimum_is_never_taken(tmp_path):
    """Keeping bad0 alone in float makes the worst calibration item worse: that candidate is measured, not taken,
    and the held-out gate judges the best one the checks saw."""
    minima = {0: 0.90, 1: 0.85, 2: 0.93, 4: 0.92, 5: 0.91}
    result, seen, messages, gated = search(tmp_path, minimum_of=lambda floats: minima[len(floats)])
    assert [len(s) for s in seen] == [0, 1, 2, 4, 5]
    assert [a["taken"] for a in result["attempts"]] == [True, False, True, False, False]
    assert gated == [{"bad0", "bad1"}] and result["float_nodes"] == ["bad0", "bad1"]
    assert "(lowers the minimum or the mean: not taken)" in messages[2]


def test_a_candidate_that_passes_the_checks_can_still_fail_the_gate(tmp_path):
    result, _, _, gated = search(tmp_path, passes_when=lambda floats: True, gate_passes=False)
    assert gated == [set()] and not result["fidelity"].passed
    assert result["why"] == ["mean cosine 0.9 < 0.995"]  # the gate's own failures: no fallback story to tell


def test_without_fallback_one_attempt(tmp_path):
    result, seen, _, gated = search(tmp_path, fallback=False)
    assert seen == [set()] and len(result["attempts"]) == 1 and gated == [set()]
    assert result["ranking"] == [] and not result["fidelity"].passed
    assert result["why"] == ["mean cosine 0.9 < 0.995"]


@pytest.mark.parametrize(("layers", "float_nodes"), [(2, 0), (5, 1)])
def test_exactly_80_percent_is_allowed_less_is_not(tmp_path, layers, float_nodes):
    """Equal layers: one in float leaves 50 % (2 layers: the first failure ends the search) or exactly 80 %
    (5 layers: allowed; two in float, 60 %, is not)."""
    rng = np.random.default_rng(2)
    model = make_model(
        [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(layers)],
        [float_input(f"x{i}", ["rows", K]) for i in range(layers)],
        [f"y{i}" for i in range(layers)],
        {f"w{i}": rng.normal(size=(K, 4)).astype(np.float32) for i in range(layers)},
    )
    feeds = [{f"x{i}": rng.normal(size=(8, K)).astype(np.float32) for i in range(layers)} for _ in range(2)]
    options = QuantizeOptions(
        precision="int8", target="tensorrt", smooth=False, fallback=True, error_ranges=False, gptq=False
    )
    calls, messages = [], []
    result = search_int8(
        {"decoder": model},
        {"decoder": lambda limit=None: feeds[:limit]},
        {"decoder": 1},
        tmp_path,
        options,
        Judges(
            check=lambda quantized: calls.append(float_matmuls(quantized["decoder"])) or Verdict(passed=False),
            gate=lambda quantized: Verdict(passed=False),
        ),
        messages.append,
        {},
    )
    assert [len(c) for c in calls] == list(range(float_nodes + 1))
    assert [a["int8_flop_share"] for a in result["attempts"]] == pytest.approx([1.0, 0.8][: float_nodes + 1])
    assert len(result["float_nodes"]) == float_nodes
    assert f"the fallback stops at {float_nodes} ops in float: one more would leave less than 80%" in messages[-2]
    assert result["why"] is not None


def test_the_callers_float_graphs_are_weightless_while_the_search_runs(tmp_path):
    """Once saved for the search, a float graph's weights are cleared, not their memory (protobuf frees a message's
    bytes with the message): the caller's graph becomes the weightless file-backed one (0.5 GB less at the Qwen3
    bench preset's peak); the chosen candidate replaces it at the end."""
    loaded = parallel_matmuls()
    big = np.ones((64, 64), np.float32)  # 16 KiB: saved as external data (the search's threshold is 1 KiB)
    loaded.graph.initializer.append(onnx.numpy_helper.from_array(big, "big"))
    loaded.graph.node.append(helper.make_node("Identity", ["big"], ["big_out"], name="big_identity"))
    loaded.graph.output.append(helper.make_tensor_value_info("big_out", onnx.TensorProto.FLOAT, [64, 64]))
    models = {"decoder": loaded}
    during: list[bool] = []

    def check(quantized):
        during.append(all(not init.raw_data for init in models["decoder"].graph.initializer if init.external_data))
        during.append(any(init.external_data for init in models["decoder"].graph.initializer))
        during.append(models["decoder"] is not loaded)  # saving leaves `loaded` weightless too, but holding the memory
        return Verdict(passed=True, overall={"mean_cosine": 1.0, "min_cosine": 1.0, "top1": 1.0})

    options = QuantizeOptions(
        precision="int8", smooth=False, fallback=False, error_ranges=False, gptq=False, wide_weights=False
    )
    gate = lambda quantized: Verdict(passed=True)  # noqa: E731
    judges = Judges(check, gate)
    search_int8(models, {"decoder": calibration_feeds}, {"decoder": 1}, tmp_path, options, judges, print, {})
    assert during == [True, True, True]
    assert not any(init.external_data for init in models["decoder"].graph.initializer)  # the chosen candidate


def report(minimum: float) -> GateReport:
    """A check report with its minimum-cosine check (threshold 0.99, the check's)."""
    return GateReport(
        "fidelity",
        "candidate vs FP32 parent",
        [Check("all items", "min cosine", minimum, 0.99)],
        overall={"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0},
        cosines=[minimum, 0.999],
    )


def test_a_passing_check_is_confirmed_on_items_the_fit_did_not_read(tmp_path):
    """The fitted items pass with one float op and from four on; the unseen ones only from four: the search goes on
    to four, and once the unseen items failed a passing check every later candidate is judged on both sets."""
    fitted: list[set[str]] = []
    unseen: list[set[str]] = []

    def check(quantized):
        fitted.append(float_matmuls(quantized["decoder"]))
        return report({0: 0.9, 2: 0.985}.get(len(fitted[-1]), 0.995))

    def confirm(quantized):
        unseen.append(float_matmuls(quantized["decoder"]))
        return report(0.995 if len(unseen[-1]) >= 4 else 0.97)

    options = QuantizeOptions(
        precision="int8", smooth=False, error_ranges=False, rank_ops=0, gptq=False, wide_weights=False, per_token=False
    )
    messages: list[str] = []
    result = _confirmed_search(tmp_path, options, check, confirm, messages.append)
    assert [len(s) for s in fitted] == [0, 1, 2, 4, 4]  # the last is the gate (the same fake judge)
    # where the fitted items passed; then the best so far (no float op), judged on both sets like the rest; then all
    assert [len(s) for s in unseen] == [1, 0, 2, 4]
    attempts = result["attempts"]
    assert ["unseen_check" in a for a in attempts] == [False, True, True, True]
    assert [a["check_passed"] for a in attempts] == [False, False, False, True]
    assert attempts[1]["unseen_check"]["min_cosine"] == 0.97 and attempts[1]["fitted_check"]["min_cosine"] == 0.995
    assert [a["check"]["min_cosine"] for a in attempts] == [0.9, 0.97, 0.97, 0.995]  # both sets' minimum
    assert len(result["float_nodes"]) == 4 and result["fidelity"].passed
    assert any("unseen items: mean cos 0.99900, min 0.97000" in m and m.endswith("→ fail") for m in messages)
    assert any("the best so far too (min cos 0.90000)" in m for m in messages)
    names = [c["name"] for c in result["check"]["checks"]]
    assert names == ["all items", "unseen calibration items: all items"]


def test_of_several_passing_candidates_the_first_and_the_one_taken_are_confirmed(tmp_path):
    """Every check passes and every variant raises the minimum: each is taken in turn, and only the first (the early
    sign that the fitted items overstate) and the last (the candidate the gate judges) are read on the unseen items."""
    fitted: list[set[str]] = []
    unseen: list[int] = []

    def check(quantized):
        fitted.append(float_matmuls(quantized["decoder"]))
        return report(0.99 + 0.001 * len(fitted))

    def confirm(quantized):
        unseen.append(len(fitted))
        return report(0.995)

    options = QuantizeOptions(precision="int8", smooth=False, rank_ops=0, per_token=False)
    result = _confirmed_search(tmp_path, options, check, confirm, lambda message: None)
    attempts = result["attempts"]
    assert len(attempts) >= 2 and all(a["taken"] and a["check_passed"] for a in attempts)
    assert unseen == [1, len(attempts)]  # with the first check, and after the last attempt's, before the gate
    assert ["unseen_check" in a for a in attempts] == [True] + [False] * (len(attempts) - 2) + [True]
    assert result["check"]["unseen"]["overall"]["min_cosine"] == 0.995
    assert result["fidelity"].passed


def _confirmed_search(tmp_path, options, check, confirm, say):
    """`search_int8` on the parallel-MatMul graph, `check` judging (the gate too) and `confirm` reading unseen items."""
    judges = Judges(check=check, gate=check, confirm=confirm)
    feeds, tokens = {"decoder": calibration_feeds}, {"decoder": 1}
    return search_int8({"decoder": parallel_matmuls()}, feeds, tokens, tmp_path, options, judges, say, {})
