"""The INT8 search: statistics, outlier smoothing, quantization, and float fallback under the 80 % FLOP rule."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pue.calibration.candidates import (
    GPTQ,
    MIN_INT8_FLOP_SHARE,
    READERS,
    SPLIT,
    better,
    fits,
    flags_of,
    other_rounding,
    ranges_record,
    ranges_rule,
    widest_fitting,
    with_flags,
)
from pue.calibration.graph_ops import int8_flop_share, weight_ops
from pue.fidelity import GateReport
from pue.precisions import TokenOutliers

if TYPE_CHECKING:
    from pue.calibration.channel_split import ChannelSplit, ReaderSplit
    from pue.calibration.target_parity import TargetParity

__all__ = ["MIN_INT8_FLOP_SHARE", "Judges", "search_int8"]


def search_int8(
    models: dict[str, Any],
    feeds: dict[str, Callable[..., Any]],
    tokens: dict[str, int],
    work: Path,
    options: Any,
    judges: Judges,
    say: Callable[[str], None],
    timings: dict[str, float],
    phase_done: Callable[[str], None] = lambda phase: None,
    layouts: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Statistics, smoothing, then quantize → check, keeping the most sensitive layers float while checks fail;
    the held-out gate judges the chosen candidate once.

    Every decision reads calibration items only: `judges.check` stages a candidate and measures its embeddings
    against the FP32 parent on calibration patches, captions and composed rows (end to end, what the gate
    measures); a fallback step that lowers the minimum cosine is never taken. `judges.gate` then runs the held-out
    gate on the chosen candidate, whose graphs end up in `models`. `phase_done` is told when each phase ends.
    `layouts`: each graph's attention heads (the manifest's `export.attention`), for smoothing's v_proj fold.
    """
    import onnx

    from pue.calibration.channel_split import (
        amplified_channels,
        masked_moments,
        masked_ranges,
        read_float_inputs,
        save_split_graphs,
    )
    from pue.calibration.gptq import round_weights, weight_reader
    from pue.calibration.int8 import activation_scheme, quantize_dynamic_graph, quantize_static_graph, rank_sensitivity
    from pue.calibration.measured_ranking import rank_fallback
    from pue.calibration.per_token import TOKEN_OUTLIER_RATIO, quantize_per_token
    from pue.calibration.readers import OrtReader
    from pue.calibration.smoothing import smooth_model
    from pue.calibration.stats import collect_channel_stats

    scheme = activation_scheme(options.precision, options.target)
    static = options.spec.calibrated  # static Q/DQ (calibrated scales) on MatMul/Gemm/Conv; else dynamic, MatMul
    all_ops, all_stats, smoothed, float_paths = [], {}, [], {}
    # the graphs whose residual-stream writers' amplified columns can be computed in float (`channel_split`): the
    # split copy of the float graph, and what was split
    split_paths: dict[str, Path] = {}
    splits: dict[str, ChannelSplit] = {}
    # ... and the copies whose stream readers also compute the amplified input rows in float (`split_reader_rows`)
    reader_paths: dict[str, Path] = {}
    reader_splits: dict[str, ReaderSplit] = {}
    started = time.perf_counter()
    for name, model in models.items():
        amplified = amplified_channels(model) if options.split_channels else ([], [])  # before smoothing's folds
        ops = [op for op in weight_ops(model, name) if static or op.op_type == "MatMul"]
        say(f"{name}: activation statistics of {len(ops)} weight-bearing ops")
        stats = collect_channel_stats(model, ops, feeds[name](), seed=options.seed)
        if options.smooth:
            ops, stats, groups = smooth_model(model, ops, stats, scheme, layout=(layouts or {}).get(name))
            smoothed += [dict(g.to_dict(), graph=name) for g in groups]
        all_ops += ops
        all_stats.update(stats)
        float_paths[name] = work / f"{name}.float.onnx"
        onnx.save_model(model, str(float_paths[name]), save_as_external_data=True, location=f"{name}.float.data")
        if amplified[0]:
            prepared = save_split_graphs(float_paths[name], name, amplified)
            splits[name] = prepared.writers
            if prepared.writers_path is not None:
                split_paths[name] = prepared.writers_path
            if prepared.readers is not None and prepared.readers_path is not None:
                reader_splits[name], reader_paths[name] = prepared.readers, prepared.readers_path
        # saving cleared the graph's weights, not their memory (protobuf frees a message's bytes with the message): the
        # search reads the file from here on, so the caller's graph becomes the weightless one and the loaded one goes
        models[name] = onnx.load(str(float_paths[name]), load_external_data=False)
    if smoothed:
        say(f"smoothing: migrated activation outliers of {len(smoothed)} op groups into their weights")
    for name, split in splits.items():
        if split.writers:
            say(
                f"{name}: residual channels {split.channels} amplified by later norm gains (up to "
                f"{max(split.gain_ratios):.0f}x): their columns of {len(split.writers)} writers tried in float"
            )
    timings["statistics_s"] = time.perf_counter() - started
    phase_done("statistics")

    # Ops whose inputs carry token outliers (massive activations, high-norm ViT tokens): one per-tensor step starves
    # every other token. The precision's entry (`PrecisionSpec.token_outliers`) says what is tried for them: per token
    # (int8-dynamic, `pue.calibration.per_token`) or float (static INT8: standard ONNX and OpenVINO have no per-token
    # int8 kernel; within the 80 % rule, while the check fails). The check set decides whether either is done.
    massive = {
        op.node
        for op in all_ops
        if all_stats.get(op.activation) is not None and all_stats[op.activation].token_ratio >= TOKEN_OUTLIER_RATIO
    }
    token_mode = options.spec.token_outliers
    if token_mode == TokenOutliers.PER_TOKEN and not options.per_token:  # --no-per-token
        token_mode = None
    if token_mode == TokenOutliers.FLOAT and not options.fallback:  # --no-fallback: nothing is kept in float
        token_mode = None
    token_candidates = massive if token_mode == TokenOutliers.PER_TOKEN else set()
    massive_float = massive if token_mode == TokenOutliers.FLOAT else set()
    if massive:
        what = {TokenOutliers.PER_TOKEN: "tried per token", TokenOutliers.FLOAT: "tried in float if int8 fails"}
        say(f"token outliers: {len(massive)} ops read massive tokens: {what.get(token_mode, 'left as they are')}")

    # Static INT8 with MinMax: each activation's range is pue's (`pue.calibration.ranges`), handed to onnxruntime as
    # overrides (its calibration pass then reads one row); the error-chosen ranges are a second candidate.
    own_ranges = static and options.method == "minmax"
    range_rules: dict[str, dict[str, tuple[float, float]]] = {}
    clips: dict[str, float] = {}
    if own_ranges:
        from pue.calibration.ranges import minmax_ranges, mse_ranges

        range_rules["minmax"] = minmax_ranges(all_ops, all_stats)
        range_rules["mse"] = {}
        for name, path in float_paths.items():
            chosen_ranges, chosen_clips = mse_ranges(
                onnx.load(str(path)), [o for o in all_ops if o.graph == name], all_stats, scheme
            )
            range_rules["mse"].update(chosen_ranges)
            clips.update(chosen_clips)

    for readers in reader_splits.values():  # the readers' masked inputs: their sources' ranges without the channels
        for rule_ranges in range_rules.values():
            rule_ranges.update(masked_ranges(readers, all_stats))

    # each graph's last quantization: (its int8 ops, rule, split) → file. An attempt that changes one graph's ops (most
    # fallback and token steps change the decoder's only) reloads the other's file: the same inputs, the same graph
    last: dict[str, tuple[tuple[tuple[str, ...], str, bool], Path]] = {}
    activation_of = {op.node: op.activation for op in all_ops if op.activation in all_stats}

    def moment_of(node: str) -> Any:  # GPTQ's Hessian: the op's input second moment on calibration tokens
        return all_stats[activation_of[node]].second_moment() if node in activation_of else None

    gptq_cache: dict[tuple, Any] = {}  # GPTQ's levels per op and grid, kept across attempts
    reader_gptq_cache: dict[tuple, Any] = {}  # the same for the readers' split graphs (other weights, other moments)
    reader_models: dict[str, Any] = {}  # those graphs, without their weights (GPTQ reads the zeroed rows from there)
    gptq_ops: dict[str, list[str]] = {}  # per graph: the ops its last quantization re-rounded
    token_gptq: dict[str, list[str]] = {}  # per graph: the per-token ops whose weights GPTQ rounded, last attempt

    target_float: set[str] = set()  # ops the target backend computes differently from onnxruntime (`target_parity`)

    def quantize(float_nodes: set[str], per_token: set[str] = frozenset(), rule: str = "minmax") -> dict[str, Any]:
        quantized = {}
        for name in float_paths:
            quantized[name], fresh = quantize_graph(name, float_nodes, per_token, rule)
            while fresh and judges.parity is not None and static and last[name][0][0]:
                # the target backend must compute this Q/DQ graph as onnxruntime does (the fallback's ranking
                # simulates onnxruntime's arithmetic): the ops it computes differently stay float from here on
                found = judges.parity.check(
                    name, quantized[name], last[name][0][0], say, float_graph=source_of(name, rule), path=last[name][1]
                )
                if not found:
                    break
                target_float.update(found)
                quantized[name], fresh = quantize_graph(name, float_nodes, per_token, rule)
        phase_done("calibration" if static else "quantization")
        return quantized

    def source_of(name: str, rule: str) -> Path:
        """The float graph a rule quantizes: with the readers' and writers' split, the writers' only, or neither."""
        if READERS in rule and name in reader_paths:
            return reader_paths[name]
        return split_paths[name] if SPLIT in rule and name in split_paths else float_paths[name]

    def quantize_graph(name: str, float_nodes: set[str], per_token: set[str], rule: str) -> tuple[Any, bool]:
        """One graph's candidate, and whether it was quantized afresh (else the last file is reloaded)."""
        gptq = GPTQ in rule
        split = SPLIT in rule and name in split_paths
        readers = READERS in rule and name in reader_paths
        path = source_of(name, rule)
        skipped = float_nodes | per_token | target_float
        nodes = [op.node for op in all_ops if op.graph == name and op.node not in skipped]
        out = work / f"{name}.int8.onnx"
        request = (tuple(nodes), rule, split)
        fresh = not (name in last and last[name][0] == request)
        if not fresh:
            out = last[name][1]
        elif static:
            reader = OrtReader(feeds[name]())  # read lazily: one row when every range is pue's
            quantize_static_graph(
                path,
                out,
                reader,
                nodes,
                options.target,
                options.method,
                cache_path=work / f"{name}{'.readers' if readers else ''}.calibration.json",  # its own tensors
                ranges=range_rules.get(ranges_rule(rule)),
            )
        elif nodes:
            quantize_dynamic_graph(path, out, nodes)
        else:  # every op of this graph is per token or float
            out = path
        if fresh:
            gptq_ops[name] = []
        if nodes and fresh and (gptq or (split and static)):
            rewritten = onnx.load(str(out))
            if gptq:  # re-round onnxruntime's int8 weights (`gptq`), on the same grids
                chosen = set(nodes)
                int8_ops = [op for op in all_ops if op.graph == name and op.node in chosen]
                # the split graph's writers keep their weights; the readers' split zeroed its readers' amplified rows
                if readers and name not in reader_models:
                    reader_models[name] = onnx.load(str(path), load_external_data=False)
                reader = weight_reader(reader_models[name] if readers else models[name], work)
                moments = masked_moments(moment_of, reader_splits[name]) if readers else moment_of
                cache = reader_gptq_cache if readers else gptq_cache
                gptq_ops[name] = round_weights(rewritten, int8_ops, moments, reader, cache)
            if split and static:  # the float columns read the writers' float inputs, not their Q/DQ
                read_float_inputs(rewritten, splits[name].side_nodes)
            onnx.save_model(rewritten, str(out))
            del rewritten
        last[name] = (request, out)
        quantized = onnx.load(str(out))
        token_ops = [op for op in all_ops if op.graph == name and op.node in per_token - float_nodes]
        token_gptq[name] = []
        if token_ops:
            done = quantize_per_token(quantized, token_ops, moment_of if gptq else None)
            token_gptq[name] = done if gptq else []
        return quantized, fresh

    ranking: list[dict] = []  # SQNR, worst first
    order: list[str] = []  # the fallback's order: measured end to end where `judges.rank` is given, then SQNR
    measured_ranking: list[dict] = []
    edge = False  # the fallback took its last step: as many ops as the 80 % rule allows
    attempts: list[dict] = []
    best: tuple[set[str], Any, dict[str, Any], set[str], str] | None = None  # (float, check, graphs, per token, rule)
    keep = 0
    float_nodes: set[str] = set()
    per_token: set[str] = set()
    rule = "minmax"
    # what is tried before the sensitivity fallback, each taken only if the calibration check says it is better:
    # (float ops, per-token ops, ranges, only while the best so far fails)
    variants: list[tuple[set[str], set[str], str, bool]] = []
    if token_candidates:
        variants.append((set(), set(token_candidates), "minmax", False))
    # static INT8: the massive-token ops in float first, while the check fails. Before the error-chosen ranges: a clip
    # that happens to fit the check's rows cuts the massive tokens themselves, which the model uses (measured: on
    # `llava massive` for OpenVINO with 16 calibration patches, ranges first passed the check at min 0.9908 and
    # failed the held-out gate at 0.9013; the float reader first passes both)
    if static and options.fallback and massive_float and fits(all_ops, massive_float, tokens):
        variants.append((set(massive_float), set(), "best", True))
    # then the best so far with its int8 weights rounded by GPTQ (`gptq`: each op's output error on calibration tokens,
    # not each weight's own error, kept small; same grids, same kernels), taken if the check says better. After the
    # token-outlier variants: GPTQ fitted to the calibration rows can pass their check with a massive-token reader in
    # per-tensor int8 and fail the held-out gate (measured: `llava massive` static, 16 patches: check min 0.9926,
    # held-out 0.9683). Every later candidate is quantized with the rounding taken and, while the check fails, also
    # with the other one where it is not taken (`alternate` below): which rounding helps depends on the float and
    # per-token sets (measured: on `qwen3_vl gains-few` GPTQ raised the per-tensor candidate's minimum, and every
    # fallback step from it failed where the same steps with nearest rounding passed; on `llava_next gains-few`
    # int8-dynamic only per token + GPTQ passes)
    if options.gptq:
        variants.append((set(), set(), "best" + GPTQ, False))
    # then the writers' amplified residual columns in float (`channel_split`), where norm gains amplify channels
    if split_paths:
        variants.append((set(), set(), "best" + SPLIT, False))
    # then the readers' amplified input rows in float as well (`split_reader_rows`): measured in simulation it raised
    # `llava_next gains-few`'s minimum and lowered `llava gains-few`'s, so the check decides
    if reader_paths:
        variants.append((set(), set(), "best" + SPLIT + READERS, False))
    if not static and options.per_token:  # every input per token: what helps when norm gains make errors compound
        variants.append((set(), {op.node for op in all_ops if op.op_type == "MatMul"}, "minmax", True))
    if own_ranges and options.error_ranges and any(clip < 1.0 for clip in clips.values()):
        variants.append((set(), set(), "mse", False))
    # the ops the SQNR ranking cannot score (Conv: the vision patch embedding, whose int8 input and weights cost the
    # ci-sized fixtures up to 0.009 of minimum cosine), in float while the check fails
    unscored = {op.node for op in all_ops if op.op_type != "MatMul"}
    if static and options.fallback and unscored and fits(all_ops, unscored, tokens):
        variants.append((set(unscored), set(), "best", True))
    stopped = None
    alternate = False  # this attempt is the previous one's sets with the other weight rounding
    rounding_only = False  # this attempt differs from the best only in its weight rounding (the GPTQ variant)
    while True:
        started = time.perf_counter()
        candidate = quantize(float_nodes, per_token, rule)
        float_nodes = float_nodes | target_float  # what the target's parity kept float counts as float from here on
        share = int8_flop_share(all_ops, float_nodes, tokens)
        check = judges.check(candidate)
        phase_done("check")
        taken = best is None or better(check, best[1])
        attempts.append(
            {
                "float_nodes": sorted(float_nodes),
                "per_token_nodes": sorted(per_token - float_nodes),
                "ranges": ranges_rule(rule) if static else "dynamic",
                "weights": "gptq" if GPTQ in rule else "nearest",
                "other_rounding": alternate,
                "gptq_ops": sum(len(v) for v in [*gptq_ops.values(), *token_gptq.values()]) if GPTQ in rule else 0,
                "channel_split": SPLIT in rule,
                "reader_split": READERS in rule,
                "int8_flop_share": share,
                "check": check.overall,
                "check_passed": check.passed,
                "taken": taken,
                "seconds": time.perf_counter() - started,
            }
        )
        say(
            f"attempt {len(attempts)}: {len(float_nodes)} ops in float, {len(per_token - float_nodes)} per token"
            + (f", {ranges_rule(rule)} ranges" if own_ranges else "")
            + (", amplified writer columns in float" if SPLIT in rule else "")
            + (", amplified reader rows in float" if READERS in rule else "")
            + (", GPTQ weights" if GPTQ in rule else "")
            + (" (the same sets, the other rounding)" if alternate else "")
            + f", int8 share {share:.1%}, calibration check: "
            f"mean cos {check.overall['mean_cosine']:.5f}, min {check.overall['min_cosine']:.5f}, "
            f"top-1 {check.overall['top1']:.3f} → {'pass' if check.passed else 'fail'}"
            + ("" if taken else " (lowers the minimum or the mean: not taken)")
        )
        if taken:
            best = (set(float_nodes), check, candidate, set(per_token), rule)
        if options.gptq and not taken and not alternate and not rounding_only and not best[1].passed:
            # the same float and per-token sets with the other weight rounding, judged against the same best
            rule, alternate = other_rounding(rule), True
            continue
        alternate = rounding_only = False
        float_nodes, per_token, rule = best[0], best[3], best[4]
        variants = [v for v in variants if not (v[3] and best[1].passed)]
        if variants:  # next: another way to quantize, before the sensitivity fallback
            extra_float, variant_per_token, variant_rule, _ = variants.pop(0)
            changes_best = variant_rule.startswith("best")  # the best's sets and rule, with what the suffix names
            rounding_only = variant_rule == "best" + GPTQ
            float_nodes = float_nodes | extra_float
            per_token = best[3] if extra_float or changes_best else variant_per_token
            if changes_best:
                rule = with_flags(best[4], *flags_of(variant_rule))
            else:  # other ranges or per-token sets, with the best's weight rounding and split
                rule = with_flags(variant_rule, *flags_of(best[4]))
            continue
        if best[1].passed or not options.fallback:
            break
        if not ranking:
            for name, path in float_paths.items():
                ranking += rank_sensitivity(
                    onnx.load(str(path)), [o for o in all_ops if o.graph == name], all_stats, scheme
                )
            ranking.sort(key=lambda s: s["sqnr_db"])
            order = [s["node"] for s in ranking]
            if judges.rank is not None and options.rank_ops > 0:
                float_set, check, _, per_token_set, best_rule = best
                measured_ranking = rank_fallback(
                    models,
                    work,
                    all_ops,
                    all_stats,
                    (float_set, per_token_set, range_rules.get(ranges_rule(best_rule))),
                    check.cosines,
                    order,
                    options,
                    judges.rank,
                    say,
                )
                first = [m["node"] for m in measured_ranking]
                order = first + [node for node in order if node not in set(first)]
                phase_done("ranking")
        previous = keep
        keep = max(1, keep * 2)
        wider = best[0] | set(order[:keep])
        while wider <= best[0] and keep <= len(order):  # the variants already keep these in float: go wider
            keep *= 2
            wider = best[0] | set(order[:keep])
        if keep > len(order) and wider <= best[0]:
            stopped = "every ranked op was tried in float"
            break
        if edge or int8_flop_share(all_ops, wider, tokens) < MIN_INT8_FLOP_SHARE:
            # the last step within the rule: as many of the next ops as still fit, once
            fitting = widest_fitting(order, best[0], previous, min(keep, len(order)), all_ops, tokens)
            if edge or fitting is None:
                stopped = (
                    f"the fallback stops at {len(best[0])} ops in float: one more would leave less than "
                    f"{MIN_INT8_FLOP_SHARE:.0%} of the weight FLOPs in int8"
                )
                say(stopped)
                break
            (keep, wider), edge = fitting, True
        float_nodes = wider
    assert best is not None
    chosen, check, graphs, chosen_per_token, chosen_rule = best
    fidelity = judges.gate(graphs)
    phase_done("gate")
    say(
        f"held-out gate on the chosen candidate ({len(chosen)} ops in float): mean cos "
        f"{fidelity.overall['mean_cosine']:.5f}, min {fidelity.overall['min_cosine']:.5f}, "
        f"top-1 {fidelity.overall['top1']:.3f} → {'pass' if fidelity.passed else 'fail'}"
    )
    why = None
    if not fidelity.passed:
        why = fidelity.failures()
        if not check.passed and options.fallback:
            why.append(f"no float fallback within the {MIN_INT8_FLOP_SHARE:.0%} int8 FLOP rule passes ({stopped})")
    for name, model in graphs.items():
        models[name] = model
    return {
        "fidelity": fidelity,
        "check": check.to_dict(),
        "attempts": attempts,
        "float_nodes": sorted(chosen),
        "per_token_nodes": sorted(chosen_per_token - chosen),
        "share": int8_flop_share(all_ops, chosen, tokens),
        "smoothed": smoothed,
        "ranges": ranges_record(ranges_rule(chosen_rule), clips) if own_ranges else None,
        "weights": {
            "rounding": "gptq" if GPTQ in chosen_rule else "nearest",
            "gptq_ops": next(a["gptq_ops"] for a in reversed(attempts) if a["taken"]),
        },
        "channel_split": {
            "taken": SPLIT in chosen_rule and bool(split_paths),
            "graphs": {name: split.to_dict() for name, split in splits.items()},
            "readers_taken": READERS in chosen_rule and bool(reader_paths),
            "reader_graphs": {name: split.to_dict() for name, split in reader_splits.items()},
        }
        if options.split_channels
        else None,
        "ranking": ranking,
        "measured_ranking": measured_ranking,
        "target_parity": judges.parity.to_dict() if judges.parity is not None and static else None,
        "why": why,
    }


@dataclass(frozen=True)
class Judges:
    """How a candidate is measured: `check` on calibration items (every search decision), `gate` on held-out ones
    (once, on the chosen candidate). Both stage the candidate's graphs and compare with the FP32 parent. `rank`
    (optional) measures simulated graphs (Q/DQ computed in float) on the check items at the given indices: the
    fallback's end-to-end ranking (`pue.calibration.measured_ranking`); without it the fallback follows SQNR.
    `parity` (static INT8 for a target other than onnxruntime): each freshly quantized graph run by both backends, the
    ops the target computes differently kept float (`pue.calibration.target_parity`)."""

    check: Callable[[dict[str, Any]], GateReport]
    gate: Callable[[dict[str, Any]], GateReport]
    rank: Callable[[dict[str, Any], list[int]], GateReport] | None = None
    parity: TargetParity | None = None
