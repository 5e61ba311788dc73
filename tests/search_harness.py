"""The INT8 search on a small graph with fake judges (`pue.calibration.int8_search`): ten parallel MatMuls, four cheap
ones whose inputs carry an outlier channel and six expensive clean ones, and a `search()` whose check records what
each candidate left in float. Shared by the search's tests and the kinds-in-balance stage's."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper
from onnx_graphs import float_input, make_model

from pue.calibration.fake_quant import PREFIX
from pue.calibration.int8_search import Judges, search_int8
from pue.calibration.quantize_bundle import QuantizeOptions

K = 8
# four cheap layers whose inputs carry an outlier channel (worst first), six expensive clean ones
BAD = {"bad0": 300.0, "bad1": 100.0, "bad2": 30.0, "bad3": 10.0}
GOOD = [f"good{i}" for i in range(6)]
GRAPH_ORDER = ["good0", "bad3", "good1", "bad2", "good2", "bad1", "good3", "bad0", "good4", "good5"]  # not the rank
BAD_N, GOOD_N = 1, 16  # output columns: FLOPs per token 2·8·1 = 16 and 2·8·16 = 256


def parallel_matmuls() -> onnx.ModelProto:
    """One input per MatMul, so each layer's activation is set by its feed alone."""
    rng = np.random.default_rng(0)
    nodes, inputs, weights = [], [], {}
    for name in GRAPH_ORDER:
        w = rng.normal(size=(K, BAD_N if name in BAD else GOOD_N)).astype(np.float32)
        if name in BAD:
            w[0] = 0.0  # the outlier channel carries no signal: it only coarsens the activation's int8 grid
        weights[f"w_{name}"] = w
        inputs.append(float_input(f"x_{name}", ["rows", K]))
        nodes.append(helper.make_node("MatMul", [f"x_{name}", f"w_{name}"], [f"y_{name}"], name=name))
    return make_model(nodes, inputs, [f"y_{name}" for name in GRAPH_ORDER], weights)


def calibration_feeds(count: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(count):
        feed = {}
        for name in GRAPH_ORDER:
            x = rng.normal(size=(16, K)).astype(np.float32)
            x[:, 0] *= BAD.get(name, 1.0)
            feed[f"x_{name}"] = x
        feeds.append(feed)
    return feeds


@dataclass
class Verdict:
    passed: bool
    overall: dict = field(default_factory=lambda: {"mean_cosine": 0.9, "min_cosine": 0.8, "top1": 0.5})
    cosines: list = field(default_factory=lambda: [0.8, 0.99, 0.95])
    per_kind: dict = field(default_factory=dict)  # one kind of row only: nothing for `kind_balance` to balance
    extra: dict = field(default_factory=dict)  # `GateReport.extra`: where a check was read (fitted, unseen)

    def failures(self) -> list[str]:
        return [] if self.passed else ["mean cosine 0.9 < 0.995"]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "overall": self.overall}


def float_matmuls(model: onnx.ModelProto) -> set[str]:
    """MatMuls that still read their float weight initializer (not a DequantizeLinear output)."""
    initializers = {init.name for init in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers}


def search(
    tmp_path,
    passes_when=None,
    fallback=True,
    minimum_of=None,
    gate_passes=None,
    target="onnxruntime",
    feeds=None,
    rank=None,
    rank_ops=24,
    per_kind_of=None,
    balance_budget=0.05,
):
    """search_int8 with fake judges: the check records which MatMuls each candidate left in float (its minimum
    cosine from `minimum_of`, its kinds' figures from `per_kind_of`), the gate records what it was shown; `rank`
    stands for the end-to-end ranking judge."""
    seen: list[set[str]] = []
    gated: list[set[str]] = []

    def check(quantized):
        seen.append(float_matmuls(quantized["decoder"]))
        minimum = minimum_of(seen[-1]) if minimum_of else 0.8 + 0.001 * len(seen[-1])
        overall = {"mean_cosine": 0.9 + minimum / 100, "min_cosine": minimum, "top1": 0.5}
        per_kind = per_kind_of(seen[-1]) if per_kind_of else {}
        return Verdict(passed=passes_when is not None and passes_when(seen[-1]), overall=overall, per_kind=per_kind)

    def gate(quantized):
        gated.append(float_matmuls(quantized["decoder"]))
        return Verdict(passed=gate_passes if gate_passes is not None else passes_when is not None)

    messages: list[str] = []
    options = QuantizeOptions(
        precision="int8",
        target=target,
        smooth=False,
        fallback=fallback,
        error_ranges=False,
        rank_ops=rank_ops,
        balance_budget=balance_budget,
        gptq=False,
        wide_weights=False,  # 8-bit weights (onnxruntime, while failing) have their own tests
        per_token=False,  # so has every op per token (static onnxruntime, while failing: test_search_variants)
    )
    result = search_int8(
        {"decoder": parallel_matmuls()},
        {"decoder": feeds or calibration_feeds},
        {"decoder": 1},
        tmp_path,
        options,
        Judges(check=check, gate=gate, rank=rank),
        messages.append,
        {},
    )
    return result, seen, messages, gated


def simulated_float(model: onnx.ModelProto) -> set[str]:
    """MatMuls of a simulated candidate (`pue.calibration.fake_quant`) that read their input unquantized: float ones."""
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and not n.input[0].startswith(PREFIX)}


def check_kinds(images: float, texts: float) -> dict:
    """A check's `per_kind` for its three items: two images, one text, at these mean cosines."""
    return {
        "images": {"count": 2, "mean_cosine": images, "min_cosine": images},
        "texts": {"count": 1, "mean_cosine": texts, "min_cosine": texts},
    }
