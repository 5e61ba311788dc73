"""How the INT8 search records each attempt (`fidelity.json["attempts"]`) and says it (one progress line)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pue.calibration.candidates import GPTQ, READERS, SPLIT, WIDE, ranges_rule
from pue.fidelity import GateReport

if TYPE_CHECKING:
    from pue.calibration.search_quantizer import GraphQuantizer

__all__ = ["attempt_line", "attempt_record", "weight_bits"]


def attempt_record(
    request: tuple[set[str], set[str], str],
    options: Any,
    quantizer: GraphQuantizer,
    share: float,
    verdicts: tuple[GateReport, GateReport | None],
    taken: bool,
    alternate: bool,
    started: float,
) -> dict[str, Any]:
    """An attempt as `fidelity.json["attempts"]` records it: what was asked for (`request`: float ops, per-token ops,
    rule), its int8 share, its check (and the unseen items' where a passing check was confirmed), whether it was
    taken."""
    float_nodes, per_token, rule = request
    check, unseen = verdicts
    return {
        "float_nodes": sorted(float_nodes),
        "per_token_nodes": sorted(per_token - float_nodes),
        "ranges": ranges_rule(rule) if options.spec.calibrated else "dynamic",
        "weights": "gptq" if GPTQ in rule else "nearest",
        "weight_bits": weight_bits(options, rule),
        "other_rounding": alternate,
        "gptq_ops": quantizer.gptq_rounded() if GPTQ in rule else 0,
        "channel_split": SPLIT in rule,
        "reader_split": READERS in rule,
        "int8_flop_share": share,
        "output_bias": quantizer.bias_record(),
        "check": check.overall,
        **({"fitted_check": check.extra["fitted"], "unseen_check": unseen.overall} if unseen else {}),
        "check_passed": check.passed,
        "taken": taken,
        "seconds": time.perf_counter() - started,
    }


def weight_bits(options: Any, rule: str) -> int:
    """The bits of a candidate's int8 weights: 8, or 7 where the precision keeps 7 and the rule does not widen them
    (`search_variants.widens_weights`)."""
    return 8 if WIDE in rule or not options.spec.qdq.reduced_weight_range else 7


def attempt_line(number: int, attempt: dict[str, Any], own: bool, own_bits: int) -> str:
    """The progress line of an attempt, from its record in `attempts` (`own`: the activation ranges are pue's;
    `own_bits`: the bits of the precision's own weights)."""
    overall = attempt["check"]
    return (
        f"attempt {number}: {len(attempt['float_nodes'])} ops in float, {len(attempt['per_token_nodes'])} per token"
        + (f", {attempt['ranges']} ranges" if own else "")
        + (", amplified writer columns in float" if attempt["channel_split"] else "")
        + (", amplified reader rows in float" if attempt["reader_split"] else "")
        + (", GPTQ weights" if attempt["weights"] == "gptq" else "")
        + (", 8-bit weights" if attempt["weight_bits"] == 8 and own_bits < 8 else "")
        + (" (the same sets, the other rounding)" if attempt["other_rounding"] else "")
        + f", int8 share {attempt['int8_flop_share']:.1%}, calibration check: "
        f"mean cos {overall['mean_cosine']:.5f}, min {overall['min_cosine']:.5f}, "
        f"top-1 {overall['top1']:.3f}"
        + (
            f"; unseen items: mean cos {unseen['mean_cosine']:.5f}, min {unseen['min_cosine']:.5f}, "
            f"top-1 {unseen['top1']:.3f}"
            if (unseen := attempt.get("unseen_check"))
            else ""
        )
        + f" → {'pass' if attempt['check_passed'] else 'fail'}"
        + ("" if attempt["taken"] else " (lowers the minimum or the mean: not taken)")
    )
