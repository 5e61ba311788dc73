"""A passing calibration check confirmed on calibration items the fit did not read.

The INT8 search's ranges and GPTQ weights are fitted to the calibration patches, so a check on those same patches
overstates a candidate (measured on `llava_next gains-few` seed 0, TensorRT: min cosine 0.9905 on the 64 fitted
patches, 0.9725 on 125 others of the same images, 0.9818 on the fitted ones turned, 0.9781 at the held-out gate).
`quantize_bundle` samples a second set the fit did not read (`sampling.sample_check_patches`) and hands the search a
`Judges.confirm` that measures a candidate there. The search reads it for its first passing check, for the candidate
it is about to take (the passing best where it would stop), and for every candidate after a confirmation failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pue.fidelity import GateReport

__all__ = ["confirm_best", "fitted_only", "joined", "on_both_sets"]


def on_both_sets(
    check: GateReport,
    candidate: dict[str, Any],
    confirm: Callable[[dict[str, Any]], GateReport] | None,
    read: bool,
) -> tuple[GateReport, GateReport | None]:
    """The check on both sets where `read`: the search's first passing check (the early sign that the fitted items
    overstate), and every check once a confirmation failed (they have then shown they do). Returns the check
    (`joined` where both were read) and the unseen items' report, or None (the other steps are decided on the fitted
    items alone).

    Deciding every step on the unseen items alone was measured and lost passes: their minimum, one item of a heavy
    tail, turned down steps that raised mean and top-1 (BENCHMARKS, session 15)."""
    if confirm is None or not read:
        return check, None
    unseen = confirm(candidate)
    return joined(check, unseen), unseen


def confirm_best(
    check: GateReport, candidate: dict[str, Any], confirm: Callable[[dict[str, Any]], GateReport]
) -> tuple[GateReport, GateReport]:
    """The candidate the search would take, its passing check confirmed on the unseen items where they did not read
    it yet: between the first passing check and this one no step is read there (confirming every passing step cost
    as much as the statistics pass and changed no decision on the `bench` preset; BENCHMARKS, session 26). Returns
    both sets' verdict (`joined`) and the unseen items' report; where the unseen items fail, the search goes on with
    every later step judged on both sets (`on_both_sets`)."""
    unseen = confirm(candidate)
    return joined(check, unseen), unseen


def joined(check: GateReport, unseen: GateReport) -> GateReport:
    """Both sets' verdicts as one: the unseen items' checks join the check's (named "unseen calibration items"); the
    figures are both sets' (minimum of the minima, the rest weighted by item counts). `cosines` stay the fitted
    items' (the fallback's end-to-end ranking reads those items by index); `extra` keeps both sets' own figures."""
    counts = check.overall.get("count", 1), unseen.overall.get("count", 1)
    overall = {}
    for key, value in check.overall.items():
        other = unseen.overall.get(key, value)
        if key == "min_cosine":
            overall[key] = min(value, other)
        elif key == "count":
            overall[key] = value + other
        else:
            overall[key] = (value * counts[0] + other * counts[1]) / (counts[0] + counts[1])
    return replace(
        check,
        checks=[*check.checks, *(replace(c, name=f"unseen calibration items: {c.name}") for c in unseen.checks)],
        overall=overall,
        extra={**check.extra, "fitted": check.overall, "unseen": unseen.to_dict()},
    )


def fitted_only(report: GateReport) -> GateReport:
    """A `joined` report as the fitted items alone measured it (what a step judged on those alone is compared with);
    any other report as it is."""
    if "fitted" not in report.extra:
        return report
    prefix = "unseen calibration items: "
    return replace(
        report,
        checks=[c for c in report.checks if not c.name.startswith(prefix)],
        overall=report.extra["fitted"],
        extra={k: v for k, v in report.extra.items() if k not in ("fitted", "unseen")},
    )
