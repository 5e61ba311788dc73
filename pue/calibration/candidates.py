"""What the INT8 search's candidates are and how it chooses between them: the quantization rule each one is made
with (activation ranges, then flags: the writers' amplified columns in float, GPTQ weights, 8-bit weights), the
comparison a step must win to be taken, and the 80 % int8-FLOP rule the float fallback stays within."""

from __future__ import annotations

from typing import Any

from pue.calibration.graph_ops import int8_flop_share
from pue.fidelity import Check, GateReport

MIN_INT8_FLOP_SHARE = 0.80

# A quantization rule: the activation ranges ("minmax", "mse"), then its flags in this order
SPLIT = "+split"  # the writers' amplified residual columns in float (`pue.calibration.channel_split`)
READERS = "+readers"  # also the stream readers' amplified input rows in float (`channel_split.split_reader_rows`)
GPTQ = "+gptq"  # int8 weights rounded by GPTQ (`pue.calibration.gptq`)
WIDE = "+w8"  # 8-bit weights stored as uint8 where the precision keeps 7 bits (`pue.calibration.weight_storage`)
FLAGS = (SPLIT, READERS, GPTQ, WIDE)  # the canonical order


def ranges_rule(rule: str) -> str:
    """The activation ranges a quantization rule uses ("minmax", "mse"), without its flags."""
    return rule.split("+")[0]


def with_flags(rule: str, *flags: str) -> str:
    """`rule` with `flags` added (in the canonical order)."""
    return ranges_rule(rule) + "".join(flag for flag in FLAGS if flag in rule or flag in flags)


def flags_of(rule: str) -> tuple[str, ...]:
    """The flags a quantization rule (or a variant's suffix such as "best+split+readers") carries."""
    return tuple(flag for flag in FLAGS if flag in rule)


def other_rounding(rule: str) -> str:
    """The same quantization rule with the other weight rounding (nearest ↔ GPTQ)."""
    return rule.replace(GPTQ, "") if GPTQ in rule else with_flags(rule, GPTQ)


def ranges_record(rule: str, clips: dict[str, float]) -> dict[str, Any]:
    """What fidelity.json says of the activation ranges: the rule taken, and per tensor the clip it would apply."""
    clipped = {name: clip for name, clip in sorted(clips.items()) if clip < 1.0}
    return {"rule": rule, "clipped": clipped if rule == "mse" else {}, "mse_would_clip": len(clipped)}


def widest_fitting(
    order: list[str], base: set[str], low: int, high: int, ops: list[Any], tokens: dict[str, int]
) -> tuple[int, set[str]] | None:
    """The longest prefix of `order` (between `low` and `high` ops) that, with `base`, fits the 80 % rule and adds an
    op to `base`; None if none does."""
    for keep in range(high, low, -1):
        wider = base | set(order[:keep])
        if not wider <= base and fits(ops, wider, tokens):
            return keep, wider
    return None


def fits(ops: list[Any], floated: set[str], tokens: dict[str, int]) -> bool:
    """Whether keeping `floated` in float leaves the 80 % of weight FLOPs in int8 the rule asks for."""
    return int8_flop_share(ops, floated, tokens) >= MIN_INT8_FLOP_SHARE


def better(new: GateReport, old: GateReport) -> bool:
    """A step is taken when it passes where the old one failed, or raises the minimum without lowering the mean."""
    if new.passed != old.passed:
        return new.passed
    mean, minimum = new.overall["mean_cosine"], new.overall["min_cosine"]
    return minimum >= old.overall["min_cosine"] and mean >= old.overall["mean_cosine"] - 1e-6


def flop_share_check(share: float, target_float: list[str], backend: str | None) -> Check | None:
    """A failing check where a chosen candidate breaks the 80 % rule (only ops the target backend computes differently
    from onnxruntime, kept float by `target_parity`, can push it there: the fallback stops before it), else None."""
    if share >= MIN_INT8_FLOP_SHARE:
        return None
    note = (
        f"{len(target_float)} ops kept float because {backend} computes them differently from onnxruntime; "
        "quantize with --target onnxruntime or --precision int8-dynamic"
        if target_float
        else "too many ops kept float"
    )
    return Check("INT8 bundle", "int8 weight-FLOP share", share, MIN_INT8_FLOP_SHARE, note=note)
