"""The float fallback's ranking measured end to end: which op, kept in float, raises the embedding cosine most.

The SQNR ranking (`pue.calibration.int8.rank_sensitivity`) scores each op alone, without what comes after it: an op
whose output the model amplifies (a ViT's fc2 that writes its high-norm tokens, read by every later attention) ranks
ninth there and first end to end (measured on `llava_next vit-highnorm`, static u8: on top of the best candidate so
far, vision block 1's fc2 in float lifts the simulated minimum cosine on the check's worst items from 0.9894 to
0.9992; the next best op, 0.9897; the real check then passes at 0.9992, where the SQNR order had stalled). So the
fallback ranks a shortlist of ops by what the gate measures: for each op, the search's best candidate so far with
that op also in float, simulated (`pue.calibration.fake_quant`: the candidate's Q/DQ in float arithmetic, its own
activation ranges, per-token rows and weight range) and embedded end to end on the calibration check's worst items
against the FP32 parent. The real candidates the fallback then builds are still judged by the full check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pue.calibration.fake_quant import ActivationQuant, fake_quantize
from pue.calibration.graph_ops import WeightOp
from pue.calibration.stats import ChannelStats

RANK_ITEMS = 16  # the check's worst items under the best candidate so far: they decide its minimum and most of its mean


@dataclass(frozen=True)
class Candidate:
    """What the search's best candidate quantizes and how: the float ops, the per-token ops, the activation ranges
    (static INT8: each activation's [lo, hi]; empty for dynamic), the activation scheme and the weights' range."""

    float_nodes: frozenset[str]
    per_token: frozenset[str]
    ranges: dict[str, tuple[float, float]]
    scheme: str  # "u8" | "s8" | "dynamic" | "grouped"
    weight_qmax: int


def simulate(
    models: dict[str, Any],
    ops: list[WeightOp],
    candidate: Candidate,
    extra_float: Iterable[str] = (),
    base_dir: Path | None = None,
) -> dict:
    """Float graphs carrying `candidate`'s quantization as Q/DQ arithmetic, with `extra_float` ops also float.
    `base_dir`: the `models` were loaded without their external data, which lies there (`fake_quantize`)."""
    floated = set(candidate.float_nodes) | set(extra_float)
    return {name: _simulate_graph(name, model, ops, candidate, floated, base_dir) for name, model in models.items()}


def with_float(
    models: dict[str, Any],
    ops: list[WeightOp],
    candidate: Candidate,
    base: dict[str, Any],
    extra_float: set[str],
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """`base` (`simulate(models, ops, candidate)`) with `extra_float` ops also float: only the graphs those ops lie in
    are simulated again, the others stay the same objects (a judge may keep them staged)."""
    touched = {op.graph for op in ops if op.node in extra_float}
    floated = set(candidate.float_nodes) | extra_float
    return {
        name: _simulate_graph(name, models[name], ops, candidate, floated, base_dir) if name in touched else graph
        for name, graph in base.items()
    }


def _simulate_graph(
    name: str, model: Any, ops: list[WeightOp], candidate: Candidate, floated: set[str], base_dir: Path | None = None
) -> Any:
    picked = [op for op in ops if op.graph == name and op.node not in floated]
    plans: dict[str, ActivationQuant] = {}
    for op in picked:
        if op.node in candidate.per_token or candidate.scheme == "grouped":  # grouped: per token, finer still
            plans[op.activation] = ActivationQuant("token")
        elif candidate.scheme == "dynamic":
            plans[op.activation] = ActivationQuant("dynamic")
        else:
            lo, hi = candidate.ranges[op.activation]
            plans[op.activation] = ActivationQuant("static", candidate.scheme, lo, hi)
    return fake_quantize(model, picked, plans, candidate.weight_qmax, base_dir)


def static_ranges(
    ops: list[WeightOp], stats: dict[str, ChannelStats], chosen: dict[str, tuple[float, float]] | None
) -> dict[str, tuple[float, float]]:
    """Each activation's range as the candidate uses it: the search's chosen rule where it gave one, else MinMax."""
    ranges = {
        op.activation: (float(stats[op.activation].minimum.min()), float(stats[op.activation].maximum.max()))
        for op in ops
        if op.activation in stats
    }
    ranges.update(chosen or {})
    return ranges


def worst_items(cosines: list[float], count: int = RANK_ITEMS) -> list[int]:
    """Indices of the `count` lowest cosines, in item order."""
    order = sorted(range(len(cosines)), key=lambda i: cosines[i])
    return sorted(order[:count])


def rank_end_to_end(
    models: dict[str, Any],
    ops: list[WeightOp],
    candidate: Candidate,
    shortlist: list[str],
    measure: Callable[[dict[str, Any]], tuple[float, float]],
    say: Callable[[str], None] = lambda line: None,
    base_dir: Path | None = None,
) -> list[dict]:
    """Each shortlisted op's end-to-end effect when kept in float on top of `candidate`: best first.

    `measure(graphs)` embeds the ranking items with the simulated graphs and returns (mean, min) cosine against the
    parent; the graphs an op does not touch are passed as the same objects each time (a judge may keep them staged).
    Entries: node, graph, mean_cosine, min_cosine, and the gain over the candidate itself (`base`). `base_dir`: the
    `models` are weightless (loaded without their external data, which lies there): each simulated graph then holds
    its weights once, and no float graph is held (measured on the Qwen3-VL-2B-shaped bench preset, BENCHMARKS.md)."""
    started = time.perf_counter()
    base = simulate(models, ops, candidate, base_dir=base_dir)
    base_mean, base_min = measure(base)
    graph_of = {op.node: op.graph for op in ops}
    ranked = []
    # one graph changes per op: the others stay the base's objects, so the judge need not stage them again
    for node in sorted(shortlist, key=lambda n: list(models).index(graph_of[n])):
        mean, minimum = measure(with_float(models, ops, candidate, base, {node}, base_dir))
        ranked.append(
            {
                "graph": graph_of[node],
                "node": node,
                "mean_cosine": mean,
                "min_cosine": minimum,
                "min_gain": minimum - base_min,
                "mean_gain": mean - base_mean,
            }
        )
    ranked.sort(key=lambda r: (r["min_cosine"], r["mean_cosine"]), reverse=True)
    say(
        f"fallback ranking: {len(shortlist)} ops measured end to end (simulated, on the check's worst items: "
        f"mean {base_mean:.5f}, min {base_min:.5f} with none added) in {time.perf_counter() - started:.0f} s; "
        + (f"best: {ranked[0]['node']} → min {ranked[0]['min_cosine']:.5f}" if ranked else "none")
    )
    return ranked


def candidate_of(
    ops: list[WeightOp],
    stats: dict[str, ChannelStats],
    best: tuple[set[str], set[str], dict[str, tuple[float, float]] | None],
    weight_qmax: int,
    qdq: Any,
) -> Candidate:
    """The search's best candidate as the simulation takes it. `best`: its float ops, per-token ops and activation
    ranges (None: MinMax); `weight_qmax`: its weights' level bound; `qdq`: the precision's `QdqFlavour`."""
    float_nodes, per_token, ranges = best
    return Candidate(
        float_nodes=frozenset(float_nodes),
        per_token=frozenset(per_token - float_nodes),
        ranges=static_ranges(ops, stats, ranges) if qdq.static else {},
        scheme=str(qdq.scheme),
        weight_qmax=weight_qmax,
    )


def rank_fallback(
    models: dict[str, Any],
    work: Path,
    ops: list[WeightOp],
    stats: dict[str, ChannelStats],
    best: tuple[set[str], set[str], dict[str, tuple[float, float]] | None],
    cosines: list[float],
    weight_qmax: int,
    order: list[str],
    options: Any,
    rank: Callable[[dict[str, Any], list[int]], Any],
    say: Callable[[str], None],
) -> list[dict]:
    """The INT8 search's end-to-end ranking of the SQNR ranking's worst `options.rank_ops` ops not yet in float. `best`:
    the best candidate's float ops, per-token ops and activation ranges (None: MinMax); `cosines`: its check cosines per
    item; `weight_qmax`: its weights' level bound; `rank`: `Judges.rank`. `models`: the search's weightless
    float graphs, whose weights lie in `work` (`fake_quantize`'s base_dir); the simulation rounds weights to nearest and
    does not split the writers' columns, whatever the best candidate does."""
    candidate = candidate_of(ops, stats, best, weight_qmax, options.spec.qdq)
    shortlist = [node for node in order if node not in candidate.float_nodes][: options.rank_ops]
    items = worst_items(cosines)

    def measure(graphs: dict[str, Any]) -> tuple[float, float]:
        report = rank(graphs, items)
        return report.overall["mean_cosine"], report.overall["min_cosine"]

    return rank_end_to_end(models, ops, candidate, shortlist, measure, say, base_dir=work)


__all__ = [
    "RANK_ITEMS",
    "Candidate",
    "candidate_of",
    "rank_end_to_end",
    "rank_fallback",
    "simulate",
    "static_ranges",
    "with_float",
    "worst_items",
]
