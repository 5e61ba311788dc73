"""The parent's own sensitivity to rounding: what a failed INT8 gate is measured against.

A checkpoint trained in bf16 computed every forward pass of its training with bf16 inputs to its matrix products, so
its embeddings barely move when its graphs do the same (measured: the `bench` preset in OpenVINO bf16, gate minimum
0.99995). A model whose embeddings move past the gate under that uniform rounding is sensitive where trained models
are not, and INT8, whose steps are coarser still (a per-tensor int8 step is 1/127 of the range, bf16's 1/256 of each
value), passes there only where the search keeps the sensitive parts finer than bf16 does: amplified channels and
ops in float, rows per token (measured on the random-weight `gains-*` fixtures, BENCHMARKS.md sessions 20-21: of the
parents whose floor fails, `llava gains-all` seed 0 passes onnxruntime static INT8 per token with both channel
splits, min 0.9879, and int8-dynamic; the others fail every INT8 mode). So the floor does not forbid INT8; it says
whether a failure is the quantizer's (the floor passes with room) or comes from a model that leaves 8 bits little or
no room, and the user should know which before tuning the quantizer.

`bf16_rounded` makes that arithmetic in standard ONNX, on any CPU: both operands of every MatMul, Gemm and Conv (the
weights and the attention's products included; biases and everything else stay f32, as bf16 kernels accumulate
and add in f32) go through Cast→bfloat16→Cast, which onnxruntime rounds to nearest even (the verdict agreed with
OpenVINO's own bf16 inference on 12 of 12 fixture parents). `measure_floor` runs it on the gate's own items when an
INT8 gate fails; `bundle_floor` on an FP32 bundle before any quantization (`pue-export floor`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnx import TensorProto, helper

from pue.errors import PueError
from pue.fidelity import FidelityThresholds, GateReport

ROUNDED_OPS = ("MatMul", "Gemm", "Conv")  # operands rounded: the first two inputs (activation, weight / activation)
PREFIX = "pue_bf16_"
FLOAT = TensorProto.FLOAT
#: under this share of the gate's cosine allowance left by bf16 rounding alone, a passing floor is "tight": measured,
#: `llava_next gains-few` seed 1 (floor minimum 0.9801 against 0.98, 0.5 % left) fails static INT8 on TensorRT at
#: 0.644 and passes per token only; the other passing `gains-*` parents leave 70-94 % and pass static INT8 where
#: measured (one fails top-1 alone, by near-duplicate swaps). Between those, the line is a judgement, not a measurement
TIGHT = 0.5
ARITHMETIC = "bf16 inputs of every MatMul, Gemm and Conv (both operands; f32 accumulation), simulated in onnxruntime"


def bf16_rounded(model: Any, in_place: bool = False) -> Any:
    """`model` (a copy unless `in_place`: a multi-billion-parameter graph is not held twice) whose MatMul, Gemm and
    Conv nodes read their first two inputs rounded to bfloat16.

    Each rounded tensor gets one Cast pair, placed right before its first reader (the graph stays topologically
    sorted: the tensor is a graph input, an initializer or an output of an earlier node)."""
    out = model if in_place else copy.deepcopy(model)
    graph = out.graph
    rounded: dict[str, str] = {}  # tensor -> its rounded copy
    nodes: list[Any] = []
    for node in graph.node:
        if node.op_type in ROUNDED_OPS and node.domain in ("", "ai.onnx"):
            for position, name in enumerate(node.input[:2]):
                if not name:
                    continue
                if name not in rounded:
                    tag = f"{PREFIX}{len(rounded)}"
                    rounded[name] = f"{tag}_f32"
                    nodes += [
                        helper.make_node("Cast", [name], [f"{tag}_bf16"], name=f"{tag}_to", to=TensorProto.BFLOAT16),
                        helper.make_node("Cast", [f"{tag}_bf16"], [rounded[name]], name=f"{tag}_back", to=FLOAT),
                    ]
                node.input[position] = rounded[name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def measure_floor(
    paths: dict[str, Path], evaluate: Callable[[dict[str, Any]], GateReport], say: Callable[[str], None]
) -> dict[str, Any]:
    """The parent's graphs (`paths`, by graph name) in bf16 arithmetic (`bf16_rounded`), measured by `evaluate` (the
    gate's items and thresholds, float graphs run by onnxruntime): a record for `fidelity.json` and the failure's
    reasons. Each graph is loaded and rounded in place: memory for the parent's graphs once, as the gate's staging.

    `headroom`: the share of the gate's cosine allowance (1 − threshold, for the mean and for the minimum; the
    smaller) that bf16 rounding alone leaves unused. `verdict`: "fails" (the parent fails the gate), "tight" (it
    passes with under `TIGHT` of the allowance left: int8 rounds every op at least as coarsely as bf16, so 8 bits
    have less room still) or "clear"."""
    import onnx

    report = evaluate({name: bf16_rounded(onnx.load(str(path)), in_place=True) for name, path in paths.items()})
    overall = report.overall
    headroom = min(
        (overall[key] - report.thresholds[key]) / (1.0 - report.thresholds[key])
        for key in ("mean_cosine", "min_cosine")
        if report.thresholds.get(key, 1.0) < 1.0
    )
    verdict = "fails" if not report.passed else "tight" if headroom < TIGHT else "clear"
    record = {
        "arithmetic": ARITHMETIC,
        "passed": report.passed,
        "headroom": headroom,
        "verdict": verdict,
        "overall": {key: overall.get(key) for key in ("count", "mean_cosine", "min_cosine", "top1")},
    }
    said = {"fails": "FAILS the gate", "tight": "passes the gate only just", "clear": "passes the gate"}[verdict]
    say(
        f"rounding floor: the parent in bf16 arithmetic measures mean {overall['mean_cosine']:.5f} / min "
        f"{overall['min_cosine']:.5f} / top-1 {overall['top1']:.3f} on the gate's items: {said} "
        f"({share_left(headroom)} of its allowance left)"
    )
    return record


def bundle_floor(
    bundle: str | Path,
    heldout: str | Path | None = None,
    thresholds: FidelityThresholds | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The rounding floor of an FP32 bundle before any quantization (`pue-export floor`): its graphs in bf16 arithmetic
    against its own fp32 embeddings on the gate's held-out items (`heldout`, default the shipped ones), with the
    quantize gate's thresholds. The rounded graphs are staged as the quantizer stages its candidates (a derivation of
    the bundle, in a temporary directory beside it, tokenizer hard-linked), and nothing is left behind."""
    import tempfile

    from pue.bundle import read_manifest, verify_files
    from pue.calibration.staging import Staged, evaluate_staged
    from pue.derive import Derivation
    from pue.gate_set import GateSet
    from pue.precisions import bundle_spec
    from pue.runtime import Embedder

    say = progress or (lambda message: None)
    root = Path(bundle)
    manifest = read_manifest(root)
    if manifest.precision != "fp32":
        raise PueError(
            f"{root} holds {manifest.precision} graphs; the rounding floor is measured on an FP32 bundle",
            "run it on the bundle `pue-export onnx` wrote, the parent of your quantized bundles",
        )
    verify_files(root, manifest)
    gate_set = GateSet.default(heldout)
    limits = thresholds or FidelityThresholds()
    spec = bundle_spec(manifest.precision, manifest.target)
    say(f"gate set: {gate_set.counts()}")
    with Embedder.load(root, backend="onnxruntime") as parent:
        reference = gate_set.embed(parent)
    # beside the bundle, as `pue-export quantize` stages: a multi-billion-parameter graph may not fit the system's tmp
    with tempfile.TemporaryDirectory(prefix=".pue-floor-", dir=root.absolute().parent) as scratch:
        child = Derivation(root, manifest, Path(scratch) / root.name, Path(scratch))
        child.link_from_parent(manifest.tokenizer.file.path)
        staged = Staged()  # float graphs run by onnxruntime, as the quantizer's simulated candidates are
        paths = {name: root / graph.file.path for name, graph in manifest.graphs.items()}
        record = measure_floor(
            paths, lambda graphs: evaluate_staged(graphs, child, gate_set, reference, spec, limits, staged), say
        )
    return {"bundle": str(root), **record}


def floor_reason(record: dict[str, Any]) -> str:
    """One line for a failed INT8 gate's message: whether the parent itself passes the gate in bf16 arithmetic."""
    overall = record["overall"]
    measured = f"min cosine {overall['min_cosine']:.4f}, top-1 {overall['top1']:.3f}"
    verdict = record.get("verdict") or ("clear" if record["passed"] else "fails")
    left = f"{share_left(record.get('headroom', 1.0))} of the gate's allowance left"
    if verdict == "clear":
        return (
            f"the parent passes the same gate in bf16 arithmetic ({measured}; {left}), so the error is the "
            "quantizer's: try another --target, int8-dynamic, or more calibration patches (--calib, --num-patches)"
        )
    if verdict == "tight":
        return (
            f"the parent passes the same gate in bf16 arithmetic only just ({measured}; {left}): int8 rounds at least "
            "as coarsely as bf16, so this model leaves 8 bits little room; INT8 passes here only where the search "
            "keeps the sensitive parts finer (per-token rows: int8-dynamic, or static INT8 for onnxruntime and "
            "OpenVINO), else fp16 keeps it"
        )
    return (
        f"the parent itself fails this gate in bf16 arithmetic ({measured}): its embeddings are sensitive to rounding "
        "that models trained in bf16 tolerate, so INT8 passes only where the search keeps the sensitive parts finer "
        "(try int8-dynamic); deploy it in fp16 or fp32 if none does, and check the checkpoint"
    )


def share_left(headroom: float) -> str:
    """A share of the gate's allowance, readable when it is small (0.5 %, not 0 %)."""
    return f"{max(headroom, 0.0):.1%}" if headroom < 0.1 else f"{headroom:.0%}"


__all__ = [
    "ARITHMETIC",
    "ROUNDED_OPS",
    "TIGHT",
    "bf16_rounded",
    "bundle_floor",
    "floor_reason",
    "measure_floor",
    "share_left",
]
