"""A small float budget spent where one kind of row carries most of the error (after the INT8 search passes).

The gate judges every kind of row together, and its mean threshold is far looser than what retrieval between kinds
needs. On `bench` (OpenVINO, both INT8 modes) the check passed with the texts' error 4-5× the images' (gate: texts
mean cosine 0.99977, images 0.99995), and that error was what flipped PMEB-mini's lists: the captions' embeddings
alone, replaced by the FP32 parent's, took its agreement from 97.3 % to 99.6 % (the images' alone: no change). Text
rows are short: the first decoder layer's writers add their int8 error to a residual stream that is still small
there, where an image row's hundreds of tokens have grown it (measured: layer 0's v_proj, o_proj and down_proj in
float halved the texts' error, every later layer ≤ 15 % each; the agreement rose to 99.6 % at 1.9 % of the weight
FLOPs in float). So once a candidate passes, where one kind's mean error is at least `RATIO` × the rest's, the
search measures which ops that kind needs in float and spends up to `--balance-budget` of the weight FLOPs on them:

1. each block (the ops of one numbered module, `block_of`) of the graphs that kind reaches, in float on top of the
   best candidate, simulated (`measured_ranking.simulate`) and embedded on that kind's check items: the error each
   block costs;
2. each op of the `OPENED` costliest blocks alone, the same way;
3. the ops whose own gain is at least `MIN_GAIN` of that kind's error, by gain per FLOP, while the budget lasts.

The INT8 search then quantizes that candidate for real; the calibration check takes it only where it is better
(`candidates.better`) and lowers that kind's error, like every other step. The simulation rounds weights to nearest,
whatever the candidate's rounding (as the fallback's ranking does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pue.calibration.candidates import fits
from pue.calibration.graph_ops import WeightOp, int8_flop_share
from pue.calibration.measured_ranking import RANK_ITEMS, Candidate, simulate, with_float

__all__ = [
    "DEFAULT_BUDGET",
    "MIN_GAIN",
    "OPENED",
    "RATIO",
    "Balance",
    "block_of",
    "choose_ops",
    "kind_errors",
    "kind_items",
    "measure_balance",
    "unbalanced_kind",
]

RATIO = 2.0  # a kind whose mean error is at least this many times the other kinds' together is worth a budget
MIN_GAIN = 0.05  # an op is spent on only where it alone removes at least this share of that kind's error
OPENED = 2  # blocks whose ops are measured one by one
DEFAULT_BUDGET = 0.05  # share of the weight FLOPs the stage may keep in float (the 80 % rule still holds)


@dataclass
class Balance:
    """What the stage measured and chose (`fidelity.json["kind_balance"]`)."""

    kind: str
    error: float  # 1 − mean cosine of that kind on the check
    rest_error: float  # the other kinds' together
    simulated_error: float = 0.0  # that kind's error on its items with the best candidate simulated
    blocks: list[dict] = field(default_factory=list)  # each block in float: the simulated error
    ops: list[dict] = field(default_factory=list)  # each op of the opened blocks alone
    chosen: list[str] = field(default_factory=list)
    chosen_flop_share: float = 0.0  # of the weight FLOPs, the chosen ops
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kind_errors(per_kind: dict[str, dict[str, float]]) -> dict[str, tuple[float, int]]:
    """Each kind's mean error (1 − mean cosine) and item count, from a report's `per_kind`."""
    return {kind: (1.0 - float(v["mean_cosine"]), int(v["count"])) for kind, v in per_kind.items()}


def unbalanced_kind(per_kind: dict[str, dict[str, float]], ratio: float = RATIO) -> tuple[str, float, float] | None:
    """(kind, its error, the other kinds' count-weighted error) where the worst kind's error is at least `ratio` ×
    the rest's; None where the kinds are balanced, or there is only one."""
    errors = kind_errors(per_kind)
    if len(errors) < 2:
        return None
    worst = max(errors, key=lambda kind: errors[kind][0])
    rest = [(error, count) for kind, (error, count) in errors.items() if kind != worst]
    rest_error = sum(e * c for e, c in rest) / max(sum(c for _, c in rest), 1)
    error = errors[worst][0]
    if error <= 0 or error < ratio * rest_error:
        return None
    return worst, error, rest_error


def kind_items(
    per_kind: dict[str, dict[str, float]], cosines: list[float], kind: str, most: int = RANK_ITEMS
) -> list[int]:
    """Indices (in the report's item order: kinds in `per_kind`'s order) of `kind`'s `most` lowest cosines."""
    start = 0
    for name, values in per_kind.items():
        count = int(values["count"])
        if name == kind:
            own = sorted(range(start, start + count), key=lambda i: cosines[i])
            return sorted(own[:most])
        start += count
    raise KeyError(kind)


def block_of(op: WeightOp) -> str:
    """The op's block: its graph and the node name up to its first numbered module (`/layers.3`, `/blocks.0`, `/h.2`),
    else up to its top-level module (`/last_layer`, `/multi_modal_projector`)."""
    parts = [p for p in op.node.split("/") if p]
    for index, part in enumerate(parts[:-1]):
        stem, _, number = part.rpartition(".")
        if stem and number.isdigit():
            return f"{op.graph}:/" + "/".join(parts[: index + 1])
    return f"{op.graph}:/" + (parts[0] if len(parts) > 1 else op.node)


def reached_graphs(kind: str, graphs: list[str]) -> list[str]:
    """The graphs a kind's rows run through: a text row only the decoder's, every other kind all of them."""
    return [g for g in graphs if g == "decoder"] if kind == "texts" else list(graphs)


def choose_ops(
    measured: list[dict],
    base_error: float,
    ops: list[WeightOp],
    floated: set[str],
    tokens: dict[str, int],
    budget: float,
) -> list[str]:
    """The measured ops worth their FLOPs: own gain ≥ `MIN_GAIN` of `base_error`, best gain per FLOP first, while the
    chosen ones together stay within `budget` of the weight FLOPs (and the 80 % rule)."""
    flops = {op.node: op.flops_per_token * tokens[op.graph] for op in ops}
    total = sum(flops.values()) or 1
    worth = [m for m in measured if m["gain"] >= MIN_GAIN * base_error and flops.get(m["node"], 0) > 0]
    worth.sort(key=lambda m: m["gain"] / flops[m["node"]], reverse=True)
    chosen: list[str] = []
    spent = 0.0
    for entry in worth:
        cost = flops[entry["node"]] / total
        if spent + cost > budget or not fits(ops, floated | set(chosen) | {entry["node"]}, tokens):
            continue
        chosen.append(entry["node"])
        spent += cost
    return chosen


def measure_balance(
    models: dict[str, Any],
    work: Path,
    ops: list[WeightOp],
    tokens: dict[str, int],
    candidate: Candidate,
    unbalanced: tuple[str, float, float],
    items: list[int],
    rank: Callable[[dict[str, Any], list[int]], Any],
    budget: float,
    say: Callable[[str], None] = lambda line: None,
) -> Balance:
    """Steps 1-3 of the module's docstring: the ops `unbalanced`'s kind needs in float on top of `candidate`, measured
    on the check items `items` with `rank` (`Judges.rank`), within `budget`."""
    started = time.perf_counter()
    kind, error, rest_error = unbalanced
    balance = Balance(kind, error, rest_error)
    graphs = reached_graphs(kind, list(models))
    open_ops = [op for op in ops if op.graph in graphs and op.node not in candidate.float_nodes]
    base = simulate(models, ops, candidate, base_dir=work)

    def error_with(extra: set[str]) -> float:
        return 1.0 - float(rank(with_float(models, ops, candidate, base, extra, work), items).overall["mean_cosine"])

    balance.simulated_error = base_error = 1.0 - float(rank(base, items).overall["mean_cosine"])
    blocks: dict[str, list[str]] = {}
    for op in open_ops:
        blocks.setdefault(block_of(op), []).append(op.node)
    for name, nodes in blocks.items():
        balance.blocks.append({"block": name, "ops": len(nodes), "error": error_with(set(nodes))})
    costliest = sorted(balance.blocks, key=lambda b: b["error"])[:OPENED]
    for block in costliest:
        for node in blocks[block["block"]]:
            own = error_with({node})
            balance.ops.append({"node": node, "block": block["block"], "error": own, "gain": base_error - own})
    floated = set(candidate.float_nodes)
    balance.chosen = choose_ops(balance.ops, base_error, ops, floated, tokens, budget)
    balance.chosen_flop_share = int8_flop_share(ops, floated, tokens) - int8_flop_share(
        ops, floated | set(balance.chosen), tokens
    )
    balance.seconds = time.perf_counter() - started
    say(
        f"kinds in balance: {kind} carry {error / max(rest_error, 1e-12):.1f}x the other rows' error "
        f"({error:.2e} vs {rest_error:.2e}); {len(blocks)} blocks and {len(balance.ops)} ops measured "
        f"(simulated, {len(items)} {kind} items: {base_error:.2e} as it is) in {balance.seconds:.0f} s; "
        + (
            f"{len(balance.chosen)} ops chosen ({balance.chosen_flop_share:.1%} of the weight FLOPs): "
            + ", ".join(balance.chosen)
            if balance.chosen
            else "no op worth its FLOPs within the budget"
        )
    )
    return balance
