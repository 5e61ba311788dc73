"""The INT8 search: statistics, outlier smoothing, quantization, and float fallback under the 80 % FLOP rule."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pue.calibration.graph_ops import int8_flop_share, weight_ops
from pue.fidelity import GateReport

MIN_INT8_FLOP_SHARE = 0.80


def search_int8(
    models: dict[str, Any],
    feeds: dict[str, Callable[..., Any]],
    tokens: dict[str, int],
    work: Path,
    options: Any,
    evaluate: Callable[[dict[str, Any]], GateReport],
    say: Callable[[str], None],
    timings: dict[str, float],
    phase_done: Callable[[str], None] = lambda phase: None,
) -> dict[str, Any]:
    """Statistics, smoothing, then quantize → gate, keeping the worst layers float while the gate fails.

    `evaluate` stages a candidate's graphs and runs the fidelity gate; `models` is updated in place with the
    last candidate's graphs. `phase_done` is told when each phase ends (statistics, calibration, gate).
    """
    import onnx

    from pue.calibration.int8 import activation_scheme, quantize_dynamic_graph, quantize_static_graph, rank_sensitivity
    from pue.calibration.readers import OrtReader
    from pue.calibration.smoothing import smooth_model
    from pue.calibration.stats import collect_channel_stats

    scheme = activation_scheme(options.precision, options.target)
    static = options.spec.calibrated  # static Q/DQ (calibrated scales) on MatMul/Gemm/Conv; else dynamic, MatMul
    all_ops, all_stats, smoothed, float_paths = [], {}, [], {}
    started = time.perf_counter()
    for name, model in models.items():
        ops = [op for op in weight_ops(model, name) if static or op.op_type == "MatMul"]
        say(f"{name}: activation statistics of {len(ops)} weight-bearing ops")
        stats = collect_channel_stats(model, ops, feeds[name](), seed=options.seed)
        if options.smooth:
            ops, stats, groups = smooth_model(model, ops, stats, scheme)
            smoothed += [dict(g.to_dict(), graph=name) for g in groups]
        all_ops += ops
        all_stats.update(stats)
        float_paths[name] = work / f"{name}.float.onnx"
        onnx.save_model(model, str(float_paths[name]), save_as_external_data=True, location=f"{name}.float.data")
    if smoothed:
        say(f"smoothing: migrated activation outliers of {len(smoothed)} op groups into their weights")
    timings["statistics_s"] = time.perf_counter() - started
    phase_done("statistics")

    ranking: list[dict] = []
    attempts: list[dict] = []
    float_nodes: set[str] = set()
    keep = 0
    while True:
        share = int8_flop_share(all_ops, float_nodes, tokens)
        started = time.perf_counter()
        quantized = {}
        for name, path in float_paths.items():
            nodes = [op.node for op in all_ops if op.graph == name and op.node not in float_nodes]
            out = work / f"{name}.int8.onnx"
            if static:
                reader = OrtReader(feeds[name]())
                quantize_static_graph(
                    path,
                    out,
                    reader,
                    nodes,
                    options.target,
                    options.method,
                    cache_path=work / f"{name}.calibration.json",
                )
            else:
                quantize_dynamic_graph(path, out, nodes)
            quantized[name] = onnx.load(str(out))
        phase_done("calibration" if static else "quantization")
        fidelity = evaluate(quantized)
        phase_done("gate")
        attempts.append(
            {
                "float_nodes": sorted(float_nodes),
                "int8_flop_share": share,
                "overall": fidelity.overall,
                "passed": fidelity.passed,
                "seconds": time.perf_counter() - started,
            }
        )
        say(
            f"attempt {len(attempts)}: {len(float_nodes)} ops in float, int8 share {share:.1%}, "
            f"mean cos {fidelity.overall['mean_cosine']:.5f}, min {fidelity.overall['min_cosine']:.5f}, "
            f"top-1 {fidelity.overall['top1']:.3f} → {'pass' if fidelity.passed else 'fail'}"
        )
        if fidelity.passed or not options.fallback:
            break
        if not ranking:
            ranking = []
            for name, path in float_paths.items():
                ranking += rank_sensitivity(
                    onnx.load(str(path)), [o for o in all_ops if o.graph == name], all_stats, scheme
                )
            ranking.sort(key=lambda s: s["sqnr_db"])
        keep = max(1, keep * 2)
        if keep > len(ranking):
            break
        candidate = {s["node"] for s in ranking[:keep]}
        if int8_flop_share(all_ops, candidate, tokens) < MIN_INT8_FLOP_SHARE:
            say(
                f"keeping the {keep} worst ops in float would leave less than {MIN_INT8_FLOP_SHARE:.0%} "
                "of the weight FLOPs in int8"
            )
            break
        float_nodes = candidate
    why = None
    if not fidelity.passed and options.fallback and keep:
        why = fidelity.failures() + [
            f"no float fallback within the {MIN_INT8_FLOP_SHARE:.0%} int8 FLOP rule passes the gate"
        ]
    for name, model in quantized.items():
        models[name] = model
    return {
        "fidelity": fidelity,
        "attempts": attempts,
        "float_nodes": sorted(float_nodes),
        "share": share,
        "smoothed": smoothed,
        "ranking": ranking,
        "why": why,
    }
