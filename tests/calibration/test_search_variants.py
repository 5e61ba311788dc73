"""What the INT8 search tries before its sensitivity fallback (issue 14, items 3 and 5), on a graph whose first op
reads a massive token: int8-dynamic tries that op per token, then (only while the check still fails) every op per
token; static INT8 tries error-chosen ranges, then (only while failing) the massive-token op in float within the
80 % rule. Each is taken only when the calibration check says it is better."""

from __future__ import annotations

import io

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import float_input, make_model
from rich.console import Console
from search_fakes import Verdict, search_decoder

from pue.calibration.quantize_bundle import QuantizeOptions

K, N = 16, 64  # the wide op is most of the FLOPs, so keeping `massive` float stays within the 80 % rule


def two_matmuls():
    rng = np.random.default_rng(0)
    plain = rng.normal(size=(N, N)).astype(np.float32)
    plain[0] = 0.0
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w_massive"], ["y"], name="massive"),
            helper.make_node("MatMul", ["z", "w_plain"], ["u"], name="plain"),
        ],
        [float_input("x", ["rows", K]), float_input("z", ["rows", N])],
        ["y", "u"],
        {
            "w_massive": rng.normal(size=(K, 2)).astype(np.float32),
            "w_plain": plain,
        },
    )
    feeds = []
    for _ in range(3):
        x = rng.normal(size=(32, K)).astype(np.float32)
        x[0] *= 1000.0  # a massive token
        z = rng.normal(size=(32, N)).astype(np.float32)
        z[3, 0] = 15.0  # a spike the weights ignore (row 0 is zero): the error-chosen range clips it
        feeds.append({"x": x, "z": z})
    return model, feeds


def describe(model) -> tuple[frozenset[str], frozenset[str]]:
    """(per-token ops, float ops) of a candidate graph."""
    outputs = {"y": "massive", "u": "plain"}
    per_token = {
        outputs[n.output[0]] for n in model.graph.node if n.name.startswith("pue_token_") and n.output[0] in outputs
    }
    initializers = {i.name for i in model.graph.initializer}
    floats = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers}
    return frozenset(per_token), frozenset(floats)


def search(tmp_path, precision, scores):
    """search_int8 with a check that scores each candidate by `scores[(per-token ops, float ops)]` (min cosine)."""
    tmp_path.mkdir(parents=True)
    model, feeds = two_matmuls()
    seen = []

    def check(quantized):
        seen.append(describe(quantized["decoder"]))
        minimum = scores.get(seen[-1], 0.9)
        return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

    target = "tensorrt" if precision == "int8" else "onnxruntime"
    options = QuantizeOptions(precision=precision, target=target, smooth=False, gptq=False)
    result = search_decoder(model, feeds, tmp_path, options, check, gate=check)
    return result, seen[:-1]  # the last one is the gate's


NONE = frozenset()


def test_dynamic_tries_the_massive_op_per_token_then_everything_per_token_while_failing(tmp_path):
    massive, both = frozenset({"massive"}), frozenset({"massive", "plain"})
    result, seen = search(tmp_path / "a", "int8-dynamic", {(massive, NONE): 0.95, (both, NONE): 0.99})
    assert [s[0] for s in seen] == [NONE, massive, both]
    assert [a["taken"] for a in result["attempts"]] == [True, True, True]
    assert result["per_token_nodes"] == ["massive", "plain"] and result["fidelity"].passed
    # the massive op per token already passes: everything per token is not tried
    result, seen = search(tmp_path / "b", "int8-dynamic", {(massive, NONE): 0.99})
    assert [s[0] for s in seen] == [NONE, massive] and result["per_token_nodes"] == ["massive"]


def test_static_tries_the_massive_op_in_float_then_error_chosen_ranges(tmp_path):
    """The massive-token reader first (a range clip fitted to the check's rows cuts the massive tokens themselves),
    then the error-chosen ranges on top of the best so far."""
    result, seen = search(tmp_path / "a", "int8", {(NONE, frozenset({"massive"})): 0.99})
    assert [s[1] for s in seen][:2] == [NONE, frozenset({"massive"})]
    assert [a["ranges"] for a in result["attempts"]][:3] == ["minmax", "minmax", "mse"]
    assert [s[1] for s in seen][-1] == frozenset({"massive"})
    assert result["float_nodes"] == ["massive"] and result["fidelity"].passed
    assert result["share"] >= 0.8


def test_a_graph_the_attempt_does_not_change_is_quantized_once(tmp_path, monkeypatch):
    """Two graphs, three attempts each. int8-dynamic: per tensor, the massive op per token (the vision graph's file is
    reloaded, not quantized again), every op per token (no graph left to quantize). Static INT8: per tensor, the
    massive op in float (vision reloaded), the error-chosen ranges (a new request for both graphs)."""
    from collections import Counter

    from pue.calibration import int8
    from pue.calibration.int8_search import Judges, search_int8

    rng = np.random.default_rng(1)
    vision_weights = rng.normal(size=(K, N)).astype(np.float32)
    vision_rows = [{"p": rng.normal(size=(8, K)).astype(np.float32)} for _ in range(3)]
    originals = {name: getattr(int8, name) for name in ("quantize_static_graph", "quantize_dynamic_graph")}
    expected = {"int8-dynamic": {"vision": 1, "decoder": 2}, "int8": {"vision": 2, "decoder": 3}}
    for precision, target in (("int8-dynamic", "onnxruntime"), ("int8", "tensorrt")):
        decoder, rows = two_matmuls()  # fresh graphs per search: it saves them with external data
        vision = make_model(
            [helper.make_node("MatMul", ["p", "w_vision"], ["v"], name="vision_proj")],
            [float_input("p", ["rows", K])],
            ["v"],
            {"w_vision": vision_weights},
        )
        calls: Counter = Counter()
        for name, original in originals.items():

            def counted(model_path, *args, _original=original, _calls=calls, **kwargs):
                _calls[model_path.name.split(".")[0]] += 1
                return _original(model_path, *args, **kwargs)

            monkeypatch.setattr(int8, name, counted)
        scores = iter([0.9, 0.95, 0.99, 0.99])

        def check(quantized, scores=scores):
            assert set(quantized) == {"vision", "decoder"}
            minimum = next(scores)
            return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

        work = tmp_path / precision
        work.mkdir()
        result = search_int8(
            {"vision": vision, "decoder": decoder},
            {"vision": lambda limit=None: vision_rows[:limit], "decoder": lambda limit=None, rows=rows: rows[:limit]},
            {"vision": 1, "decoder": 1},
            work,
            QuantizeOptions(precision=precision, target=target, smooth=False, gptq=False),
            Judges(check=check, gate=check),
            lambda message: None,
            {},
        )
        assert len(result["attempts"]) == 3, result["attempts"]
        assert calls == expected[precision], (precision, calls)
        assert result["fidelity"].passed


def test_onnxruntime_tries_8_bit_weights_last_and_only_while_the_check_fails(tmp_path, monkeypatch):
    """onnxruntime's INT8 keeps 7-bit weights; while the check fails, the search tries the full 8 bits stored as uint8
    (exact in onnxruntime's u8×u8 kernels on every CPU), taken when the check says better. Never when the 7-bit
    candidate passes, nor for TensorRT (8 bits already), nor with `wide_weights=False`."""
    from pue.calibration.search_variants import widens_weights

    def unsigned(model) -> bool:
        return any(init.data_type == TensorProto.UINT8 and init.dims for init in model.graph.initializer)

    def run_search(work, target, wide_passes, seven_passes=False, **extra):
        work.mkdir(parents=True)
        model, feeds = two_matmuls()
        seen = []

        def check(quantized):
            seen.append(unsigned(quantized["decoder"]))
            minimum = 0.99 if (wide_passes if seen[-1] else seven_passes) else (0.94 if seen[-1] else 0.95)
            return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

        extra = {"per_token": False, **extra}  # the per-token variants that follow it: their own test
        options = QuantizeOptions(
            precision="int8", target=target, smooth=False, gptq=False, fallback=False, error_ranges=False, **extra
        )
        return search_decoder(model, feeds, work, options, check, gate=check), seen[:-1], options

    result, seen, options = run_search(tmp_path / "a", "onnxruntime", wide_passes=True)
    assert widens_weights(options) and seen == [False, True]
    assert [a["weight_bits"] for a in result["attempts"]] == [7, 8]
    assert [a["taken"] for a in result["attempts"]] == [True, True] and result["fidelity"].passed
    assert result["weights"]["bits"] == 8 and result["weights"]["stored_unsigned"]
    result, seen, _ = run_search(tmp_path / "b", "onnxruntime", wide_passes=True, seven_passes=True)
    assert seen == [False] and result["weights"] == {**result["weights"], "bits": 7, "stored_unsigned": False}
    result, seen, _ = run_search(tmp_path / "c", "onnxruntime", wide_passes=False)  # tried, worse: not taken
    assert [a["taken"] for a in result["attempts"]] == [True, False] and result["weights"]["bits"] == 7
    result, seen, options = run_search(tmp_path / "d", "tensorrt", wide_passes=True)
    assert not widens_weights(options) and seen == [False] and result["weights"]["bits"] == 8
    result, seen, options = run_search(tmp_path / "e", "onnxruntime", wide_passes=True, wide_weights=False)
    assert not widens_weights(options) and seen == [False]
    # OpenVINO: only where its int8 kernels are exact
    monkeypatch.setattr("pue.calibration.search_variants.saturating_u8s8", lambda: True)
    assert not widens_weights(QuantizeOptions(precision="int8", target="openvino"))
    assert widens_weights(QuantizeOptions(precision="int8-dynamic"))


def test_openvino_tries_8_bit_int8_weights_only_where_its_int8_kernels_do_not_saturate(tmp_path, monkeypatch):
    """OpenVINO reads uint8 weights around 128 as compressed float weights, so its 8-bit weights stay int8: tried
    (while the check fails) only on a CPU whose int8 kernels do not saturate on them (VNNI, AMX, ARM), and the
    manifest's weights then say full range, which such a bundle is refused for elsewhere."""
    from pue.calibration.quantized_manifest import weights_record
    from pue.calibration.search_variants import stores_weights_unsigned, widens_weights
    from pue.precisions import INT8_WEIGHTS, INT8_WEIGHTS_7BIT

    def widest_level(model) -> int:
        levels = [
            np.abs(np.asarray(numpy_helper.to_array(init), dtype=np.int32)).max()
            for init in model.graph.initializer
            if init.data_type in (TensorProto.INT8, TensorProto.UINT8) and init.dims
        ]
        assert all(init.data_type != TensorProto.UINT8 or not init.dims for init in model.graph.initializer)
        return int(max(levels))

    def run_search(work):
        work.mkdir(parents=True)
        model, feeds = two_matmuls()
        seen = []

        def check(quantized):
            seen.append(widest_level(quantized["decoder"]))
            minimum = 0.99 if seen[-1] > 64 else 0.95
            return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

        options = QuantizeOptions(
            precision="int8",
            target="openvino",
            smooth=False,
            gptq=False,
            fallback=False,
            error_ranges=False,
            per_token=False,  # the int8-weight-only variant that follows it: its own test
        )
        return search_decoder(model, feeds, work, options, check, gate=check), seen[:-1], options

    monkeypatch.setattr("pue.calibration.search_variants.saturating_u8s8", lambda: False)
    result, seen, options = run_search(tmp_path / "a")
    assert widens_weights(options) and not stores_weights_unsigned(options)
    assert seen == [64, 127] and [a["weight_bits"] for a in result["attempts"]] == [7, 8]
    assert result["weights"]["bits"] == 8 and result["weights"]["widened"] and not result["weights"]["stored_unsigned"]
    assert weights_record(options.spec, result["weights"]) == INT8_WEIGHTS and result["fidelity"].passed
    monkeypatch.setattr("pue.calibration.search_variants.saturating_u8s8", lambda: True)
    result, seen, options = run_search(tmp_path / "b")
    assert not widens_weights(options) and seen == [64] and not result["fidelity"].passed
    assert weights_record(options.spec, result["weights"]) == INT8_WEIGHTS_7BIT


def test_once_8_bit_weights_are_taken_the_variants_judged_with_7_bits_are_tried_again(tmp_path):
    """The massive-token op in float loses with 7-bit weights; 8-bit weights are taken but still fail the check; the
    massive-token op in float is then tried again with 8-bit weights, and passes. A variant the best already carries
    is not tried again, and nothing is retried once the check passes."""
    from pue.calibration.search_variants import Variant, retried_with_8_bit_weights

    model, feeds = two_matmuls()
    # per tensor·7, massive in float·7 (lower), per tensor·8 (higher), massive in float·8 (passes), the gate
    scores = iter([0.95, 0.94, 0.96, 0.99, 0.99])

    def check(quantized):
        minimum = next(scores)
        return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

    work = tmp_path / "a"
    work.mkdir()
    options = QuantizeOptions(precision="int8", target="onnxruntime", smooth=False, gptq=False, error_ranges=False)
    result = search_decoder(model, feeds, work, options, check, gate=check)
    attempts = [(a["float_nodes"], a["weight_bits"], a["taken"]) for a in result["attempts"]]
    assert attempts == [([], 7, True), (["massive"], 7, False), ([], 8, True), (["massive"], 8, True)], attempts
    assert result["float_nodes"] == ["massive"] and result["weights"]["bits"] == 8 and result["fidelity"].passed

    gptq, split, mse = (Variant(set(), set(), rule, False) for rule in ("best+gptq", "best+split", "mse"))
    in_float = Variant({"massive"}, set(), "best", True)
    retried = retried_with_8_bit_weights([in_float, gptq, split, mse], {"massive"}, set(), "minmax+split+w8")
    assert retried == [gptq._replace(while_failing=True), mse._replace(while_failing=True)]


def test_no_candidate_is_asked_for_twice(tmp_path):
    """GPTQ taken with 7-bit weights; 8-bit weights taken with nearest rounding (their GPTQ attempt lost); the GPTQ
    variant retried with 8 bits would ask for that lost attempt again: it is passed over."""
    model, feeds = two_matmuls()
    # 7 bits: per tensor, massive in float (both roundings), GPTQ; 8 bits: GPTQ, nearest; massive in float (both)
    scores = iter([0.95, 0.94, 0.94, 0.955, 0.95, 0.96, 0.94, 0.94])

    def check(quantized):
        minimum = next(scores, 0.90)  # the fallback's steps after them: lower, not taken
        return Verdict(False, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

    def gate(quantized):
        return Verdict(False, {"mean_cosine": 0.999, "min_cosine": 0.96, "top1": 1.0})

    work = tmp_path / "a"
    work.mkdir()
    options = QuantizeOptions(precision="int8", target="onnxruntime", smooth=False, error_ranges=False)
    result = search_decoder(model, feeds, work, options, check, gate=gate)
    requests = [
        (tuple(a["float_nodes"]), tuple(a["per_token_nodes"]), a["ranges"], a["weights"], a["weight_bits"])
        for a in result["attempts"]
    ]
    assert [(r[0], r[3], r[4]) for r in requests[:8]] == [
        ((), "nearest", 7),
        (("massive",), "nearest", 7),
        (("massive",), "gptq", 7),
        ((), "gptq", 7),
        ((), "gptq", 8),
        ((), "nearest", 8),
        (("massive",), "nearest", 8),
        (("massive",), "gptq", 8),
    ], requests
    assert len(set(requests)) == len(requests), requests
    assert result["weights"]["bits"] == 8 and result["weights"]["rounding"] == "nearest"


def test_static_onnxruntime_tries_every_op_per_token_last_while_the_check_fails(tmp_path, monkeypatch):
    """Static INT8 for onnxruntime: after every static variant, while the check still fails, every weight MatMul per
    token (onnxruntime runs the rewrite in its integer kernels, so they stay int8 where the fallback would float
    them), taken when the check says better. Not when a static candidate passes, not with --no-per-token, never for
    TensorRT (standard Q/DQ has no per-token int8); OpenVINO has its own way (the next test)."""
    from types import SimpleNamespace

    from pue.calibration.graph_ops import WeightOp
    from pue.calibration.search_variants import TokenOutlierOps, initial_variants

    both = frozenset({"massive", "plain"})

    def run(work, passes_static=False, **extra):
        work.mkdir(parents=True)
        model, feeds = two_matmuls()
        seen = []

        def check(quantized):
            seen.append(describe(quantized["decoder"]))
            minimum = 0.99 if seen[-1][0] == both or passes_static else 0.95
            return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

        options = QuantizeOptions(precision="int8", target="onnxruntime", smooth=False, gptq=False, **extra)
        return search_decoder(model, feeds, work, options, check, gate=check), seen[:-1]

    result, seen = run(tmp_path / "a", fallback=False)
    assert [s[0] for s in seen][:-1] == [NONE] * (len(seen) - 1) and seen[-1] == (both, NONE)
    assert result["attempts"][-1]["taken"] and result["fidelity"].passed
    assert result["per_token_nodes"] == ["massive", "plain"] and result["share"] == 1.0
    result, seen = run(tmp_path / "b", passes_static=True)
    assert seen == [(NONE, NONE)] and result["per_token_nodes"] == []
    result, seen = run(tmp_path / "c", fallback=False, per_token=False)
    assert all(s[0] == NONE for s in seen) and not result["fidelity"].passed

    # the variants themselves: the Conv the rewrite cannot take in float where the 80 % rule allows, then the same
    # with the amplified-channel splits; none for TensorRT, OpenVINO, or with --no-per-token
    monkeypatch.setattr("pue.calibration.search_variants.saturating_u8s8", lambda: False)
    ops = [WeightOp("vision", "patch", "Conv", "px", "wc", (8, 8), 16)]
    ops += [WeightOp("decoder", f"mm{i}", "MatMul", f"x{i}", f"w{i}", (8, 8), 128) for i in range(3)]
    prepared = SimpleNamespace(ops=ops, split_paths={"decoder": "s"}, reader_paths={"decoder": "r"})
    none = TokenOutlierOps(set(), set())

    def per_token_variants(target: str, **extra) -> list:
        options = QuantizeOptions(precision="int8", target=target, **extra)
        variants = initial_variants(prepared, options, none, {"decoder": 4, "vision": 1}, False, {})
        return [v for v in variants if v.per_token]

    variants = per_token_variants("onnxruntime")
    assert [v.rule for v in variants] == ["best", "best+split", "best+split+readers"]
    assert all(v.per_token == {"mm0", "mm1", "mm2"} and v.float_nodes == {"patch"} for v in variants)
    assert all(v.while_failing for v in variants)
    assert per_token_variants("openvino") == variants
    assert per_token_variants("tensorrt") == [] and per_token_variants("onnxruntime", per_token=False) == []


def weight_only_matmuls(model) -> frozenset[str]:
    """MatMuls whose weight is an int8 constant behind a DequantizeLinear and whose input has no Q/DQ pair: what
    OpenVINO compiles into a compressed-weight FullyConnected that quantizes its input per token at run time."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    names = {"y": "massive", "u": "plain"}
    return frozenset(
        names.get(n.output[0], n.name)
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in dequantized and n.input[0] not in dequantized
    )


def test_static_openvino_leaves_every_op_to_its_run_time_quantization_last_while_the_check_fails(tmp_path):
    """Static INT8 for OpenVINO: the same last variant, as int8 weights alone (OpenVINO quantizes those MatMuls'
    inputs per token and group at run time, the int8-dynamic bundle's arithmetic); the precision pins OpenVINO's
    group size so that the gate and the runtime compute them so."""
    from pue.precisions import OPENVINO_GROUP_SIZE, bundle_spec

    model, feeds = two_matmuls()
    seen = []

    def check(quantized):
        seen.append(weight_only_matmuls(quantized["decoder"]))
        minimum = 0.99 if seen[-1] else 0.95  # passes once int8 weights stand alone
        return Verdict(minimum >= 0.98, {"mean_cosine": 0.999, "min_cosine": minimum, "top1": 1.0})

    options = QuantizeOptions(precision="int8", target="openvino", smooth=False, gptq=False, wide_weights=False)
    (tmp_path / "ov").mkdir()
    result = search_decoder(model, feeds, tmp_path / "ov", options, check, gate=check)
    assert all(s == NONE for s in seen[:-2]) and seen[-1] == seen[-2] == {"plain"}  # the chosen one, gated
    assert result["fidelity"].passed and result["per_token_nodes"] == ["plain"] and result["attempts"][-1]["taken"]
    assert result["float_nodes"] == ["massive"]  # the massive-token op's float variant came first, and stays
    assert bundle_spec("int8", "openvino").dynamic_group == OPENVINO_GROUP_SIZE

    from pue.export.inspect_bundle import _treatment, print_treatment

    out = io.StringIO()
    print_treatment(Console(file=out, width=200), _treatment(result), " (at run time)")
    assert "per token: plain (at run time)" in out.getvalue()
