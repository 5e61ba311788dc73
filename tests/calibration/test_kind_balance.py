"""The balance stage's pieces: which kind is out of balance, its items, the blocks ops belong to, and which measured
ops are worth their FLOPs within the budget (the stage in the search: tests/calibration/test_int8_search.py)."""

from __future__ import annotations

import pytest
from search_harness import GRAPH_ORDER, Verdict, check_kinds, search, simulated_float

from pue.calibration.graph_ops import WeightOp
from pue.calibration.kind_balance import MIN_GAIN, block_of, choose_ops, kind_items, unbalanced_kind


def kinds(**means: tuple[float, int]) -> dict:
    return {kind: {"mean_cosine": mean, "count": count} for kind, (mean, count) in means.items()}


def test_the_worst_kind_is_unbalanced_at_twice_the_rest_weighted_by_counts():
    found = unbalanced_kind(kinds(images=(0.99995, 64), texts=(0.9998, 12), composed=(0.9999, 8)))
    assert found is not None and found[0] == "texts"
    assert found[1] == pytest.approx(2e-4) and found[2] == pytest.approx((64 * 5e-5 + 8 * 1e-4) / 72)
    assert unbalanced_kind(kinds(images=(0.9999, 64), texts=(0.99985, 12))) is None  # 1.5x
    assert unbalanced_kind(kinds(images=(0.999, 4))) is None  # one kind: nothing to balance
    assert unbalanced_kind(kinds(images=(1.0, 4), texts=(1.0, 2))) is None  # no error at all


def test_kind_items_are_that_kinds_worst_in_the_reports_item_order():
    per_kind = kinds(images=(0.9, 3), texts=(0.9, 2), composed=(0.9, 2))
    cosines = [0.5, 0.9, 0.7, 0.99, 0.95, 0.1, 0.2]
    assert kind_items(per_kind, cosines, "texts") == [3, 4]
    assert kind_items(per_kind, cosines, "images", most=2) == [0, 2]
    assert kind_items(per_kind, cosines, "composed", most=1) == [5]
    with pytest.raises(KeyError):
        kind_items(per_kind, cosines, "image_sets")


def op(node: str, graph: str = "decoder", flops: int = 100) -> WeightOp:
    return WeightOp(graph, node, "MatMul", f"{node}_in", f"{node}_w", (10, 5), flops)


def test_blocks_are_the_first_numbered_module_else_the_top_level_one():
    assert block_of(op("/language_model/layers.12/self_attn/v_proj/MatMul")) == "decoder:/language_model/layers.12"
    assert block_of(op("/vision_tower/encoder/layers.0/mlp/fc2/MatMul", "vision")) == (
        "vision:/vision_tower/encoder/layers.0"
    )
    assert block_of(op("/blocks.3/attn/qkv/MatMul", "vision")) == "vision:/blocks.3"
    assert block_of(op("/last_layer/mlp/down_proj/MatMul")) == "decoder:/last_layer"
    assert block_of(op("/multi_modal_projector/linear_1/MatMul", "vision")) == "vision:/multi_modal_projector"
    assert block_of(op("good0")) == "decoder:/good0"
    assert block_of(op("/model/layers.x/q/MatMul")) == "decoder:/model"  # not a number: the top-level module


def test_the_chosen_ops_are_worth_their_flops_within_the_budget():
    ops = [op("a", flops=10), op("b", flops=40), op("c", flops=10), op("d", flops=940)]  # 1000 FLOPs per token
    tokens = {"decoder": 1}
    base = 1e-3
    measured = [
        {"node": "a", "gain": 2e-4},  # 2e-5 per FLOP
        {"node": "b", "gain": 6e-4},  # 1.5e-5 per FLOP
        {"node": "c", "gain": MIN_GAIN * base / 2},  # below the minimum gain: never
        {"node": "d", "gain": 9e-4},  # the largest gain, 94 % of the FLOPs: over any budget
    ]
    assert choose_ops(measured, base, ops, set(), tokens, 0.05) == ["a", "b"]
    assert choose_ops(measured, base, ops, set(), tokens, 0.04) == ["a"]  # b would make it 5 %
    assert choose_ops(measured, base, ops, set(), tokens, 0.0) == []
    # the 80 % rule still holds: with d float already nothing more fits
    assert choose_ops(measured, base, ops, {"d"}, tokens, 0.2) == []


def test_inspect_and_the_quantize_summary_name_what_the_balance_stage_kept_float():
    import io

    from rich.console import Console

    from pue.cli.quantize_commands import balance_row
    from pue.export.inspect_bundle import _treatment

    balance = {
        "kind": "texts",
        "error": 2.4e-4,
        "rest_error": 6e-5,
        "chosen": ["/language_model/layers.0/self_attn/v_proj/MatMul"],
        "chosen_flop_share": 0.004,
        "taken": True,
        "check_error": 1.1e-4,
    }
    report = {"float_nodes": ["/language_model/layers.0/self_attn/v_proj/MatMul", "other"], "kind_balance": balance}
    treatment = _treatment(report)
    assert treatment["balance_float_nodes"] == balance["chosen"] and treatment["kind_balance"] == balance
    assert balance_row(balance) == (
        "texts: 4.0x the other rows' error",
        "1 ops float (0.4% of FLOPs), taken",
        "error 2.4e-04 → 1.1e-04",
    )
    assert _treatment({**report, "kind_balance": {**balance, "taken": False}})["balance_float_nodes"] == []
    assert _treatment({"float_nodes": []})["balance_float_nodes"] == []  # bundles made before the stage existed
    assert balance_row({**balance, "chosen": [], "check_error": None})[1] == "no op worth its FLOPs"

    from pue.export.inspect_bundle import print_treatment

    out = io.StringIO()
    print_treatment(Console(file=out, width=200), treatment)
    printed = out.getvalue()
    assert "float: /language_model/layers.0/self_attn/v_proj/MatMul (texts needed it: kind balance)" in printed
    assert "float: other\n" in printed
    assert "kind balance: texts carried 4.0x the other rows' error; 1 ops chosen (0.4% of the weight FLOPs), taken" in (
        printed
    )


@pytest.mark.parametrize("real_check_better", [True, False])
def test_a_passing_search_spends_the_balance_budget_on_what_the_worst_kind_needs(tmp_path, real_check_better):
    """The check passes at once with the text rows carrying 10× the images' error; the stage measures each block
    (here each op: the names have no numbered modules) in float on the text item, then the two costliest one by one,
    and keeps bad3 in float (its gain is the texts' whole error, at 1 % of the FLOPs): the real check takes it when it
    is better and the texts' error falls, else the best stays as it was and the stage is recorded as not taken."""
    measured: list[tuple[set[str], list[int]]] = []

    def rank(simulated, items):
        floated = simulated_float(simulated["decoder"])
        measured.append((floated, items))
        mean = 0.9999 if "bad3" in floated else 0.999 + 0.00004 * ("bad2" in floated)  # gain < 5 %: not chosen
        return Verdict(passed=True, overall={"mean_cosine": mean, "min_cosine": mean, "top1": 1.0})

    def per_kind_of(floats):
        return check_kinds(0.9999, 0.9999 if "bad3" in floats and real_check_better else 0.999)

    def minimum_of(floats):
        return 0.9 if "bad3" in floats and not real_check_better else 0.95

    result, seen, messages, gated = search(
        tmp_path, passes_when=lambda floats: True, rank=rank, per_kind_of=per_kind_of, minimum_of=minimum_of
    )
    balance = result["kind_balance"]
    assert balance["kind"] == "texts" and balance["error"] == pytest.approx(1e-3)
    assert balance["rest_error"] == pytest.approx(1e-4) and balance["simulated_error"] == pytest.approx(1e-3)
    assert measured[0] == (set(), [2])  # the best as it is, on the text item (the third)
    assert [m[0] for m in measured[1:11]] == [{name} for name in GRAPH_ORDER]  # each block: one op each here
    opened = [entry["node"] for entry in balance["ops"]]
    assert opened == ["bad3", "bad2"]  # the two costliest blocks' ops, alone
    assert balance["chosen"] == ["bad3"] and balance["chosen_flop_share"] == pytest.approx(16 / 1600)
    assert seen == [set(), {"bad3"}]  # the real candidate, checked once
    assert balance["taken"] is real_check_better and balance["check_error"] == pytest.approx(
        1e-4 if real_check_better else 1e-3
    )
    assert result["float_nodes"] == (["bad3"] if real_check_better else [])
    assert gated == [{"bad3"} if real_check_better else set()]
    assert result["attempts"][-1]["float_nodes"] == ["bad3"] and result["attempts"][-1]["taken"] is real_check_better
    assert any("kinds in balance: texts carry 10.0x the other rows' error" in m for m in messages)


def test_the_balance_stage_skips_balanced_kinds_and_a_zero_budget(tmp_path):
    measured = []

    def rank(simulated, items):
        measured.append(items)
        return Verdict(passed=True, overall={"mean_cosine": 0.999, "min_cosine": 0.999, "top1": 1.0})

    result, seen, _, _ = search(
        tmp_path, passes_when=lambda f: True, rank=rank, per_kind_of=lambda f: check_kinds(0.999, 0.9985)
    )
    assert result["kind_balance"] is None and seen == [set()] and measured == []  # 1.5x: balanced enough
    (tmp_path / "zero").mkdir()
    result, seen, _, _ = search(
        tmp_path / "zero",
        passes_when=lambda f: True,
        rank=rank,
        per_kind_of=lambda f: check_kinds(0.9999, 0.99),
        balance_budget=0,
    )
    assert result["kind_balance"] is None and seen == [set()] and measured == []
