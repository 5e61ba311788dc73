"""Measure way (b) of issue 22: NNCF's post-training quantization (`nncf.quantize`, transformer model type, its
SmoothQuant) of an FP32 bundle's graphs for OpenVINO, fed by pue's calibration readers and judged by pue's fidelity
gate, against the same parent. Prints JSON and a table; writes the candidate (OpenVINO IR graphs) under --out so that
`pue-bench latency` can time it next to `pue-export quantize --precision int8 --target openvino`.

A measurement, not a deployment path: the IR bundle it writes is for this comparison (see BENCHMARKS.md, "OpenVINO
INT8"). Needs `pip install "pue[nncf]"`. NNCF's telemetry is off (NNCF_CI makes its telemetry a stub), and only
OpenVINO's runtime (`Core.read_model`, no `convert_model`) is used, which sends nothing.

    nice -n 19 python scripts/nncf_openvino_int8.py FP32_BUNDLE --out DIR [--num-patches 16] [--overflow-fix enable]
        [--graphs vision,decoder] [--smooth-quant-alpha A] [--no-bias-correction] [--ignore-types Convolution]

Diagnostics (BENCHMARKS.md "OpenVINO INT8"): `--graphs` names the graphs NNCF quantizes (the others stay the parent's
FP32 graphs), `--smooth-quant-alpha` sets SmoothQuant's alpha for MatMuls (-1 turns it off), `--no-bias-correction`
turns off NNCF's fast bias correction, `--ignore-types` keeps those OpenVINO op types float (nncf.IgnoredScope).
"""

from __future__ import annotations

import os

os.environ["NNCF_CI"] = "1"  # before nncf is imported: NNCF then sends no telemetry

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-patches", type=int, default=16)
    parser.add_argument("--num-captions", type=int, default=8)
    parser.add_argument("--overflow-fix", default="enable", choices=["enable", "first_layer_only", "disable"])
    parser.add_argument("--heldout", type=Path, default=None)
    parser.add_argument("--graphs", default="vision,decoder", help="graphs NNCF quantizes; the rest stay FP32")
    parser.add_argument("--smooth-quant-alpha", type=float, default=None, help="MatMul alpha; -1: no SmoothQuant")
    parser.add_argument("--no-bias-correction", action="store_true", help="no fast bias correction")
    parser.add_argument("--ignore-types", default="", help="OpenVINO op types kept float, e.g. Convolution")
    parser.add_argument(
        "--ignore-attention-matmuls", action="store_true", help="keep activation×activation MatMuls float"
    )
    args = parser.parse_args()

    from pue.extras import require_extras

    require_extras(["nncf", "cpu"], "scripts/nncf_openvino_int8.py")
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    from pue.bundle import file_entry, write_manifest
    from pue.calibration.readers import DecoderFeeds, VisionFeeds, default_captions, make_plan
    from pue.calibration.sampling import sample_patches
    from pue.calibration.sources import open_sources
    from pue.derive import derive_bundle
    from pue.fidelity import FidelityThresholds, measure_fidelity
    from pue.gate_set import GateSet
    from pue.runtime import Embedder

    timings: dict[str, float] = {}
    started = time.perf_counter()
    with Embedder.load(args.bundle, backend="onnxruntime") as parent:
        sources = open_sources(None, patch_size=parent.manifest.tile_size)
        patches, _ = sample_patches(sources, args.num_patches, seed=0)
        plan = make_plan(patches, default_captions(args.num_captions, 0), seed=0)
        feeds = {"vision": list(VisionFeeds(parent, plan.patches)), "decoder": list(DecoderFeeds(parent, plan))}
        gate_set = GateSet.default(args.heldout)
        reference = gate_set.embed(parent)
    timings["calibration_feeds_and_reference_s"] = time.perf_counter() - started
    core = ov.Core()
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix(args.overflow_fix), disable_bias_correction=args.no_bias_correction
    )
    if args.smooth_quant_alpha is not None:
        advanced.smooth_quant_alphas = AdvancedSmoothQuantParameters(matmul=args.smooth_quant_alpha)
    ignored = nncf.IgnoredScope(types=[t for t in args.ignore_types.split(",") if t], validate=False)
    quantized_graphs = {g for g in args.graphs.split(",") if g}
    with derive_bundle(args.bundle, args.out, overwrite=True) as child:
        manifest = child.child_manifest(precision="int8", target="openvino")
        manifest.backend = "openvino"
        started = time.perf_counter()
        for name, graph in child.parent.graphs.items():
            if name not in quantized_graphs:  # the parent's FP32 graph, unchanged
                manifest.graphs[name].file = child.link_from_parent(graph.file.path)
                manifest.graphs[name].external_data = [child.link_from_parent(e.path) for e in graph.external_data]
                continue
            model = core.read_model(str(args.bundle / graph.file.path))
            scope = ignored
            if args.ignore_attention_matmuls:
                names = attention_matmuls(model)
                scope = nncf.IgnoredScope(names=names, types=ignored.types, validate=False)
                print(f"{name}: {len(names)} activation×activation MatMuls kept float")
            quantized = nncf.quantize(
                model,
                nncf.Dataset(feeds[name]),
                model_type=nncf.ModelType.TRANSFORMER,  # SmoothQuant on MatMuls; attention products in float
                subset_size=len(feeds[name]),
                ignored_scope=scope,
                advanced_parameters=advanced,
            )
            quantized_inputs = [op for op in attention_matmuls(quantized) if fake_quantized_inputs(quantized, op)]
            print(f"{name}: {len(quantized_inputs)} activation×activation MatMuls read FakeQuantize outputs")
            ov.save_model(quantized, str(child.staging / f"{name}.xml"), compress_to_fp16=False)
            graph_entry = manifest.graphs[name]
            graph_entry.file = file_entry(child.staging, f"{name}.xml")
            graph_entry.external_data = [file_entry(child.staging, f"{name}.bin")]
        timings["nncf_quantize_s"] = time.perf_counter() - started
        child.link_from_parent(child.parent.tokenizer.file.path)
        manifest.tokenizer.file = file_entry(child.staging, manifest.tokenizer.file.path)
        write_manifest(child.staging, manifest)
        started = time.perf_counter()
        with Embedder.load(child.staging, backend="openvino", options={"cache_dir": False}) as candidate:
            report = measure_fidelity(gate_set.embed(candidate), reference, FidelityThresholds())
        timings["gate_s"] = time.perf_counter() - started
        child.gate(report, "fidelity gate (NNCF)", vars_of(args))
        child.write_json("fidelity.json", {"gate": report.to_dict(), "method": "nncf.quantize", **vars_of(args)})
        child.commit(manifest, ["fidelity.json"])
    overall = report.to_dict()["overall"]
    print(json.dumps({"passed": report.passed, "overall": overall, "timings": timings, **vars_of(args)}, indent=1))
    print("| way | mean cosine | min cosine | top-1 | nncf.quantize s | gate s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| nncf.quantize ({args.graphs}; overflow_fix {args.overflow_fix}) | {overall['mean_cosine']:.5f} | "
        f"{overall['min_cosine']:.5f} | {overall['top1']:.3f} | {timings['nncf_quantize_s']:.1f} | "
        f"{timings['gate_s']:.1f} |"
    )


PASS_THROUGH = ("Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Multiply", "Subtract")


def _rooted_in_constant(node: object) -> bool:
    """Whether a MatMul input comes from a weight (a Constant behind converts, reshapes and dequantization)."""
    seen = 0
    while node.get_type_name() in PASS_THROUGH + ("FakeQuantize",) and seen < 8:
        node, seen = node.input_value(0).get_node(), seen + 1
    return node.get_type_name() == "Constant"


def attention_matmuls(model: object) -> list[str]:
    """Friendly names of the MatMuls whose inputs are both activations (attention's scores and softmax×V)."""
    return [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "MatMul"
        and not any(_rooted_in_constant(op.input_value(i).get_node()) for i in range(2))
    ]


def fake_quantized_inputs(model: object, name: str) -> bool:
    """Whether the named MatMul reads a FakeQuantize output (through pass-through ops) on either input."""
    op = next(o for o in model.get_ops() if o.get_friendly_name() == name)
    for i in range(2):
        node, seen = op.input_value(i).get_node(), 0
        while node.get_type_name() in PASS_THROUGH and seen < 8:
            node, seen = node.input_value(0).get_node(), seen + 1
        if node.get_type_name() == "FakeQuantize":
            return True
    return False


def vars_of(args: argparse.Namespace) -> dict[str, str]:
    return {key: str(value) for key, value in vars(args).items()}


if __name__ == "__main__":
    main()
