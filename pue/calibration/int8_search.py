"""The INT8 search: statistics, outlier smoothing, quantization, and float fallback under the 80 % FLOP rule.

The float graphs it quantizes are prepared in `search_graphs`, each attempt's candidate is made in `search_quantizer`,
what it tries before the fallback is listed in `search_variants`; the rule each candidate is made with, the comparison
a step must win and the 80 % rule live in `candidates`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pue.calibration.attempts import attempt_line, attempt_record, weight_bits
from pue.calibration.candidates import (
    GPTQ,
    MIN_INT8_FLOP_SHARE,
    READERS,
    SPLIT,
    WIDE,
    better,
    flags_of,
    other_rounding,
    ranges_record,
    ranges_rule,
    widest_fitting,
    with_flags,
)
from pue.calibration.graph_ops import int8_flop_share
from pue.calibration.kind_balance import kind_items, measure_balance, unbalanced_kind
from pue.calibration.measured_ranking import candidate_of
from pue.calibration.search_graphs import PreparedGraphs, activation_ranges, own_ranges, prepare_graphs
from pue.calibration.search_quantizer import GraphQuantizer
from pue.calibration.search_variants import (
    Variant,
    initial_variants,
    retried_with_8_bit_weights,
    stores_weights_unsigned,
    token_outlier_ops,
)
from pue.calibration.unseen_check import confirm_best, fitted_only, joined, on_both_sets
from pue.calibration.weight_storage import WEIGHT_QMAX
from pue.fidelity import GateReport

if TYPE_CHECKING:
    from pue.calibration.target_parity import TargetParity

__all__ = ["MIN_INT8_FLOP_SHARE", "Judges", "search_int8"]


class Candidate(NamedTuple):
    """An attempt's candidate, as the search keeps its best."""

    float_nodes: set[str]
    check: GateReport  # `Judges.check` on it
    graphs: dict[str, Any]  # its quantized graphs
    per_token: set[str]
    rule: str  # the quantization rule it was made with (`candidates`)


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
    observers: dict[str, Callable[[Any, int, dict[str, Any]], None]] | None = None,
) -> dict[str, Any]:
    """Statistics, smoothing, then quantize → check, keeping the most sensitive layers float while checks fail;
    the held-out gate judges the chosen candidate once.

    Every decision reads calibration items only: `judges.check` stages a candidate and measures its embeddings
    against the FP32 parent on calibration patches, captions and composed rows (end to end, what the gate
    measures); a fallback step that lowers the minimum cosine is never taken. `judges.gate` then runs the held-out
    gate on the chosen candidate, whose graphs end up in `models`. `phase_done` is told when each phase ends.
    `layouts`: each graph's attention heads (the manifest's `export.attention`), for smoothing's v_proj fold.
    `observers` (per graph): shown the float graph's own outputs of each calibration row by the statistics pass
    (`prepare_graphs`): the check's parent rows are taken from the decoder's (`pue.calibration.check_rows`).
    """
    from pue.calibration.int8 import activation_scheme

    scheme = activation_scheme(options.precision, options.target)
    static = options.spec.calibrated  # static Q/DQ (calibrated scales) on MatMul/Gemm/Conv; else dynamic, MatMul
    started = time.perf_counter()
    prepared = prepare_graphs(models, feeds, work, options, scheme, say, layouts, observers)
    timings["statistics_s"] = time.perf_counter() - started
    phase_done("statistics")

    token_ops = token_outlier_ops(prepared, options, say)
    own = own_ranges(options)
    range_rules, clips = activation_ranges(prepared, own, scheme)
    quantizer = GraphQuantizer(prepared, models, feeds, work, options, range_rules, judges.parity, say, phase_done)
    all_ops = prepared.ops

    ranking: list[dict] = []  # SQNR, worst first
    order: list[str] = []  # the fallback's order: measured end to end where `judges.rank` is given, then SQNR
    measured_ranking: list[dict] = []
    edge = False  # the fallback took its last step: as many ops as the 80 % rule allows
    attempts: list[dict] = []
    best: Candidate | None = None
    keep = 0
    float_nodes: set[str] = set()
    per_token: set[str] = set()
    rule = "minmax"
    variants = initial_variants(prepared, options, token_ops, tokens, own, clips)  # tried before the fallback
    tried: list[Variant] = []  # the variants tried so far, in order
    stopped = None
    widened = False  # a confirmation on unseen calibration items failed: every later check reads both sets
    first_read = False  # the first passing check was read on the unseen items too
    resumed = False  # the best's confirmation failed just now: the search goes on from that best, not judged again
    set_aside: list[Variant] = []  # variants tried only while failing, passed over while the best passed unconfirmed
    balance = None  # the kind-balance stage's record: it runs once, on the first passing best
    balanced = False
    alternate = False  # this attempt is the previous one's sets with the other weight rounding
    rounding_only = False  # this attempt differs from the best only in its weight rounding (the GPTQ variant)
    attempted: set[tuple[frozenset[str], frozenset[str], str]] = set()  # each attempt's request, never made twice

    def made(float_nodes: set[str], per_token: set[str], rule: str) -> bool:
        """Whether an attempt already asked for this candidate (what the target's parity keeps float included)."""
        return _request(float_nodes | quantizer.target_float, per_token, rule) in attempted

    while True:
        taken = True
        if not resumed:
            started = time.perf_counter()
            attempted.add(_request(float_nodes | quantizer.target_float, per_token, rule))
            candidate = quantizer.quantize(float_nodes, per_token, rule)
            float_nodes = float_nodes | quantizer.target_float  # what the target's parity kept float counts as float
            share = int8_flop_share(all_ops, float_nodes, tokens)
            check = judges.check(candidate)
            first = check.passed and not first_read and judges.confirm is not None
            check, unseen = on_both_sets(check, candidate, judges.confirm, widened or first)
            first_read = first_read or first
            if unseen is not None and not unseen.passed and not widened:  # the fitted items overstate: both from here
                widened = True
                if best is not None and judges.confirm is not None:  # judged on the fitted items only: both
                    best = best._replace(check=joined(best.check, judges.confirm(best.graphs)))
                    say(
                        f"a passing check failed on unseen calibration items: every candidate is judged on both sets "
                        f"from here on, the best so far too (min cos {best.check.overall['min_cosine']:.5f})"
                    )
            phase_done("check")
            taken = best is None or _better(check, best.check)
            request = (float_nodes, per_token, rule)
            attempts.append(
                attempt_record(request, options, quantizer, share, (check, unseen), taken, alternate, started)
            )
            say(attempt_line(len(attempts), attempts[-1], own, weight_bits(options, "")))
            widening = taken and WIDE in rule and (best is None or WIDE not in best.rule)
            if taken:
                best = Candidate(set(float_nodes), check, candidate, set(per_token), rule)
            if widening:  # 8-bit weights taken: what was judged with 7-bit weights is tried again with them
                variants = retried_with_8_bit_weights(tried, best.float_nodes, best.per_token, best.rule) + variants
        resumed = False
        assert best is not None
        if (
            options.gptq
            and not taken
            and not alternate
            and not rounding_only
            and not best.check.passed
            and not made(float_nodes, per_token, other_rounding(rule))
        ):
            # the same float and per-token sets with the other weight rounding, judged against the same best
            rule, alternate = other_rounding(rule), True
            continue
        alternate = rounding_only = False
        float_nodes, per_token, rule = best.float_nodes, best.per_token, best.rule
        if best.check.passed:  # set aside, not dropped: they come back if the best's confirmation fails
            set_aside += [v for v in variants if v.while_failing]
            variants = [v for v in variants if not v.while_failing]
        following = _next_variant(variants, tried, best, made)
        if following is not None:  # next: another way to quantize, before the sensitivity fallback
            float_nodes, per_token, rule = following
            same_sets = float_nodes == best.float_nodes and per_token == best.per_token
            rounding_only = same_sets and other_rounding(rule) == best.rule  # the GPTQ variant
            continue
        if (
            best.check.passed
            and not balanced
            and options.fallback
            and options.balance_budget > 0
            and judges.rank is not None
        ):
            balanced = True
            context = (prepared, models, work, tokens, quantizer, range_rules)
            made_before = len(attempts)
            best, balance = _balance_kinds(context, options, judges, best, attempts, widened, say)
            if len(attempts) > made_before:
                say(attempt_line(len(attempts), attempts[-1], own, weight_bits(options, "")))
            if balance is not None:
                phase_done("balance")
        if (
            best.check.passed
            and not widened
            and judges.confirm is not None
            and "unseen" not in best.check.extra
        ):
            best = _confirmed(best, judges.confirm, attempts, say)
            phase_done("check")
            if not best.check.passed:  # the fitted items overstated: on from this best, every step on both sets
                widened = resumed = True
                variants, set_aside = set_aside + variants, []
                continue
        if best.check.passed or not options.fallback:
            break
        if not ranking:
            ranking, order, measured_ranking = _fallback_order(
                prepared, models, work, options, judges, best, range_rules, scheme, say, phase_done
            )
        previous = keep
        keep = max(1, keep * 2)
        wider = best.float_nodes | set(order[:keep])
        while wider <= best.float_nodes and keep <= len(order):  # the variants already keep these in float: go wider
            keep *= 2
            wider = best.float_nodes | set(order[:keep])
        if keep > len(order) and wider <= best.float_nodes:
            stopped = "every ranked op was tried in float"
            break
        if edge or int8_flop_share(all_ops, wider, tokens) < MIN_INT8_FLOP_SHARE:
            # the last step within the rule: as many of the next ops as still fit, once
            fitting = widest_fitting(order, best.float_nodes, previous, min(keep, len(order)), all_ops, tokens)
            if edge or fitting is None:
                stopped = (
                    f"the fallback stops at {len(best.float_nodes)} ops in float: one more would leave less than "
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
        "smoothed": prepared.smoothed,
        "ranges": ranges_record(ranges_rule(chosen_rule), clips) if own else None,
        "weights": {
            "rounding": "gptq" if GPTQ in chosen_rule else "nearest",
            "gptq_ops": next(a["gptq_ops"] for a in reversed(attempts) if a["taken"]),
            "bits": weight_bits(options, chosen_rule),
            "widened": WIDE in chosen_rule,  # 8 bits where the precision keeps 7 (`search_variants.widens_weights`)
            "stored_unsigned": WIDE in chosen_rule and stores_weights_unsigned(options),
        },
        "channel_split": {
            "taken": SPLIT in chosen_rule and bool(prepared.split_paths),
            "graphs": {name: split.to_dict() for name, split in prepared.splits.items()},
            "readers_taken": READERS in chosen_rule and bool(prepared.reader_paths),
            "reader_graphs": {name: split.to_dict() for name, split in prepared.reader_splits.items()},
        }
        if options.split_channels
        else None,
        "output_bias": next(a["output_bias"] for a in reversed(attempts) if a["taken"]),
        "ranking": ranking,
        "measured_ranking": measured_ranking,
        "kind_balance": balance,
        "target_parity": judges.parity.to_dict() if judges.parity is not None and static else None,
        "why": why,
    }


def _balance_kinds(
    context: tuple[PreparedGraphs, dict[str, Any], Path, dict[str, int], GraphQuantizer, dict],
    options: Any,
    judges: Judges,
    best: Candidate,
    attempts: list[dict],
    widened: bool,
    say: Callable[[str], None],
) -> tuple[Candidate, dict[str, Any] | None]:
    """The passing best with the float budget spent where one kind of row carries most of the error
    (`pue.calibration.kind_balance`): its chosen ops in float, quantized and checked for real, taken where the check
    is better and that kind's error falls. Returns the best (the same where nothing was taken) and the stage's record
    (None where the kinds are balanced)."""
    prepared, models, work, tokens, quantizer, range_rules = context
    unbalanced = unbalanced_kind(best.check.per_kind)
    if unbalanced is None:
        return best, None
    kind = unbalanced[0]
    weight_qmax = WEIGHT_QMAX if WIDE in best.rule else options.spec.qdq.weight_qmax
    ranges = range_rules.get(ranges_rule(best.rule))
    simulated = candidate_of(
        prepared.ops, prepared.stats, (best.float_nodes, best.per_token, ranges), weight_qmax, options.spec.qdq
    )
    items = kind_items(best.check.per_kind, best.check.cosines, kind)
    balance = measure_balance(
        models, work, prepared.ops, tokens, simulated, unbalanced, items, judges.rank, options.balance_budget, say
    )
    record = {**balance.to_dict(), "taken": False, "check_error": None}
    if not balance.chosen:
        return best, record
    started = time.perf_counter()
    float_nodes = best.float_nodes | set(balance.chosen)
    graphs = quantizer.quantize(float_nodes, best.per_token, best.rule)
    float_nodes |= quantizer.target_float
    check, unseen = on_both_sets(judges.check(graphs), graphs, judges.confirm, widened)
    error = 1.0 - float(check.per_kind[kind]["mean_cosine"])
    taken = check.passed and _better(check, best.check) and error < unbalanced[1]
    share = int8_flop_share(prepared.ops, float_nodes, tokens)
    attempts.append(
        attempt_record(
            (float_nodes, best.per_token, best.rule), options, quantizer, share, (check, unseen), taken, False, started
        )
    )
    record.update(taken=taken, check_error=error)
    if taken:
        best = Candidate(set(float_nodes), check, graphs, set(best.per_token), best.rule)
    return best, record


def _better(check: GateReport, best: GateReport) -> bool:
    """`candidates.better`, like for like: a check the unseen items did not read against the best's fitted items."""
    return better(check, best if "unseen" in check.extra else fitted_only(best))


def _confirmed(
    best: Candidate, confirm: Callable[[dict[str, Any]], GateReport], attempts: list[dict], say: Callable[[str], None]
) -> Candidate:
    """The passing best, its check confirmed on the unseen calibration items (`unseen_check.confirm_best`): both
    sets' verdict on the best and in its attempt's record (the last one taken)."""
    check, unseen = confirm_best(best.check, best.graphs, confirm)
    number = max(i for i, attempt in enumerate(attempts) if attempt["taken"])
    attempts[number].update(
        check=check.overall, fitted_check=check.extra["fitted"], unseen_check=unseen.overall, check_passed=check.passed
    )
    say(
        f"attempt {number + 1} confirmed on unseen calibration items: mean cos {unseen.overall['mean_cosine']:.5f}, "
        f"min {unseen.overall['min_cosine']:.5f}, top-1 {unseen.overall['top1']:.3f} → "
        + ("pass" if check.passed else "fail: every later step is judged on both sets, this best too")
    )
    return best._replace(check=check)


def _request(float_nodes: set[str], per_token: set[str], rule: str) -> tuple[frozenset[str], frozenset[str], str]:
    """What an attempt asks the quantizer for: the same request makes the same candidate."""
    return frozenset(float_nodes), frozenset(per_token - float_nodes), rule


def _next_variant(
    variants: list[Variant], tried: list[Variant], best: Candidate, made: Callable[[set[str], set[str], str], bool]
) -> tuple[set[str], set[str], str] | None:
    """The next variant's request (float set, per-token set, rule) from the best candidate, popped from `variants`
    (and noted in `tried`); variants whose request was already made are passed over (a variant retried with 8-bit
    weights can ask for what the 8-bit step's other rounding already tried). None when none is left."""
    while variants:
        variant = variants.pop(0)
        tried.append(variant)
        changes_best = variant.rule.startswith("best")  # the best's sets and rule, with what the suffix names
        float_nodes = best.float_nodes | variant.float_nodes
        # a variant with float ops or on the best's rule adds its per-token ops to the best's; else it replaces them
        per_token = best.per_token | variant.per_token if variant.float_nodes or changes_best else variant.per_token
        if changes_best:
            rule = with_flags(best.rule, *flags_of(variant.rule))
        else:  # other ranges or per-token sets, with the best's weight rounding and split
            rule = with_flags(variant.rule, *flags_of(best.rule))
        if not made(float_nodes, per_token, rule):
            return float_nodes, per_token, rule
    return None


def _fallback_order(
    prepared: PreparedGraphs,
    models: dict[str, Any],
    work: Path,
    options: Any,
    judges: Judges,
    best: Candidate,
    range_rules: dict[str, dict[str, tuple[float, float]]],
    scheme: Any,
    say: Callable[[str], None],
    phase_done: Callable[[str], None],
) -> tuple[list[dict], list[str], list[dict]]:
    """The fallback's ranking: each op's SQNR, worst first; the order it keeps ops float in; and, where `judges.rank`
    is given (`options.rank_ops` > 0), the first ops measured end to end from the best candidate
    (`pue.calibration.measured_ranking`), which go first in that order (else none measured)."""
    import onnx

    from pue.calibration.int8 import rank_sensitivity
    from pue.calibration.measured_ranking import rank_fallback

    ranking: list[dict] = []
    for name, path in prepared.float_paths.items():
        ranking += rank_sensitivity(onnx.load(str(path)), prepared.ops_of(name), prepared.stats, scheme)
    ranking.sort(key=lambda s: s["sqnr_db"])
    order = [s["node"] for s in ranking]
    if judges.rank is None or options.rank_ops <= 0:
        return ranking, order, []
    measured_ranking = rank_fallback(
        models,
        work,
        prepared.ops,
        prepared.stats,
        (best.float_nodes, best.per_token, range_rules.get(ranges_rule(best.rule))),
        best.check.cosines,
        WEIGHT_QMAX if WIDE in best.rule else options.spec.qdq.weight_qmax,
        order,
        options,
        judges.rank,
        say,
    )
    first = [m["node"] for m in measured_ranking]
    order = first + [node for node in order if node not in set(first)]
    phase_done("ranking")
    return ranking, order, measured_ranking


@dataclass(frozen=True)
class Judges:
    """How a candidate is measured: `check` on calibration items (every search decision), `gate` on held-out ones
    (once, on the chosen candidate). Both stage the candidate's graphs and compare with the FP32 parent. `rank`
    (optional) measures simulated graphs (Q/DQ computed in float) on the check items at the given indices: the
    fallback's end-to-end ranking (`pue.calibration.measured_ranking`); without it the fallback follows SQNR.
    `parity` (static INT8 for a target other than onnxruntime): each freshly quantized graph run by both backends, the
    ops the target computes differently kept float (`pue.calibration.target_parity`). `confirm` (optional): a
    passing check again on calibration items the fit did not read (`pue.calibration.unseen_check`)."""

    check: Callable[[dict[str, Any]], GateReport]
    gate: Callable[[dict[str, Any]], GateReport]
    confirm: Callable[[dict[str, Any]], GateReport] | None = None
    rank: Callable[[dict[str, Any], list[int]], GateReport] | None = None
    parity: TargetParity | None = None
