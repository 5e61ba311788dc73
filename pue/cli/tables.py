"""Rich tables shared by the commands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pue.cli.common import verdict


def print_fidelity(
    console: Any, gate: dict[str, Any], title: str | None = None, extra_rows: Sequence[tuple[str, str, str]] = ()
) -> None:
    """The accuracy gate's report (pue.calibration.gate) as a table, ending with one PASSED/FAILED line."""
    from rich.table import Table

    overall, thresholds = gate["overall"], gate["thresholds"]
    table = Table(title=title or f"fidelity gate ({gate.get('compared', 'engines vs parent bundle')})")
    for column in ("measure", "value", "threshold", "result"):
        table.add_column(column)
    checks = (
        ("mean cosine", "mean_cosine", "mean_cosine"),
        ("min cosine", "min_cosine", "min_cosine"),
        ("top-1 self-retrieval", "top1", "top1"),
    )
    for label, key, threshold_key in checks:
        value, threshold = overall[key], thresholds[threshold_key]
        table.add_row(
            label,
            f"{value:.5f}",
            f">= {threshold:g}",
            verdict(value >= threshold),
        )
    if "top5" in overall:
        table.add_row("top-5 self-retrieval", f"{overall['top5']:.5f}", "", "")
    table.add_row("centered mean cosine", f"{overall['centered_mean_cosine']:.5f}", "", "")
    for kind, values in gate.get("per_kind", {}).items():
        table.add_row(
            f"{kind} ({values['count']}) mean / min",
            f"{values['mean_cosine']:.5f} / {values['min_cosine']:.5f}",
            "",
            "",
        )
    for label, value, threshold in extra_rows:
        table.add_row(label, value, threshold, "")
    console.print(table)
    if gate.get("note"):
        console.print(f"note: {gate['note']}")
    console.print(verdict(gate["passed"], "PASSED", "FAILED"))
