"""PMEB reports: `report.json` (the rows), `report.md` (a readable table) and `pmeb.png` (grouped bars).

Every file is written atomically (temporary file, then `os.replace`), so a reader, or an interrupted run,
never sees half a report.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pue.errors import MissingDependencyError

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT = "pmeb.png"


def write_pmeb_report(report: dict[str, Any], report_dir: Path) -> None:
    """report.json, report.md and pmeb.png (matplotlib, Agg canvas; needs the `bench` extra)."""
    write_partial_report(report, report_dir)
    plot_pmeb(report, Path(report_dir) / PLOT)


def write_partial_report(report: dict[str, Any], report_dir: Path) -> None:
    """report.json and report.md only: cheap enough to rewrite after every finished task."""
    directory = Path(report_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / REPORT_JSON, json.dumps(report, indent=2, allow_nan=False) + "\n")
    _write_atomic(directory / REPORT_MD, render_markdown(report))


def require_matplotlib() -> None:
    """Fail before any work when the plot cannot be drawn (checked at the start of a run with --report)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("matplotlib", "bench", "the PMEB plot (pmeb.png)") from None


def column_label(row: dict[str, Any]) -> str:
    return f"{row['name']} ({row['backend']} {row['precision']})"


def render_markdown(report: dict[str, Any]) -> str:
    rows = report.get("results", [])
    config = report.get("config", {})
    lines = ["# PMEB report", ""]
    reference = config.get("reference")
    if reference:
        lines.append(
            f"Reference: `{reference['name']}` (weights sha256 {reference['sha256'][:12]}…), "
            f"{reference['precision']}, compared on the bundles' recipe and tile size."
        )
    else:
        lines.append(
            "No reference: run with `--reference CHECKPOINT` (the bundles' source) for Δ, prediction "
            "agreement and cosine."
        )
    lines.append(f"Data: `{config.get('data_dir', '?')}`. Status: **{report.get('status', '?')}**.")
    lines.append("")
    if not rows:
        lines.append("No task has finished yet.")
        return "\n".join(lines) + "\n"
    columns = list(dict.fromkeys(column_label(r) for r in rows))
    references = [c for c in columns if any(column_label(r) == c and r["backend"] == "pytorch" for r in rows)]
    backends = [c for c in columns if c not in references]
    cells = {(r["task"], r["metric"], column_label(r)): r for r in rows}
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    header = ["task", "metric", *references]
    for backend in backends:
        header += [backend, "Δ"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    homie = {(r["task"], r["metric"]): r.get("homie_name") for r in rows}
    for task, metric in keys:
        line = [task, metric + (f" (HOMIE `{homie[(task, metric)]}`)" if homie[(task, metric)] else "")]
        line += [_number(cells.get((task, metric, c), {}).get("value")) for c in references]
        for backend in backends:
            row = cells.get((task, metric, backend), {})
            line += [_number(row.get("value")), _number(row.get("delta"), signed=True)]
        lines.append("| " + " | ".join(line) + " |")
    agreement = [r for r in rows if r["backend"] != "pytorch" and r.get("mean_cosine_vs_reference") is not None]
    if agreement:
        lines += [
            "",
            "Agreement with the reference: share of top-1 predictions (retrieved item, predicted class) "
            "that match the reference's, and the mean per-sample cosine to its embeddings.",
            "",
            "| task | backend | predictions | agreement | mean cosine |",
            "|---|---|---|---|---|",
        ]
        seen = set()
        for row in agreement:
            key = (row["task"], column_label(row), row.get("predictions"))
            if key in seen:
                continue
            seen.add(key)
            lines.append(
                f"| {row['task']} | {column_label(row)} | {row.get('predictions', '')} | "
                f"{_number(row['prediction_agreement'])} | {_number(row['mean_cosine_vs_reference'], 6)} |"
            )
    lines += [
        "",
        "Recall@k is left out where k is not below the gallery size (it would be 1 by definition). pue's metrics "
        "score distinct items and count ties against the correct item; `homie_*` rows are HOMIE's (record-level "
        "pairs, torch.topk's tie order), named as HOMIE reports them (docs/pmeb.md).",
    ]
    return "\n".join(lines) + "\n"


def plot_pmeb(report: dict[str, Any], path: Path) -> None:
    """One panel per task: its metrics on the x axis, one bar per backend (reference first)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report.get("results", [])
    tasks = list(dict.fromkeys(r["task"] for r in rows)) or ["(no results)"]
    columns = list(dict.fromkeys(column_label(r) for r in rows))
    width_groups = max([len({r["metric"] for r in rows if r["task"] == t}) for t in tasks] + [1])
    figure = Figure(
        figsize=(max(6.0, 1.1 * width_groups * max(1, len(columns)) ** 0.5 + 3), 2.8 * len(tasks)), layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(tasks), 1, squeeze=False)[:, 0]
    bar = 0.8 / max(1, len(columns))
    for axis, task in zip(axes, tasks, strict=True):
        metrics = list(dict.fromkeys(r["metric"] for r in rows if r["task"] == task))
        for i, column in enumerate(columns):
            values = [
                next(
                    (r["value"] for r in rows if r["task"] == task and r["metric"] == m and column_label(r) == column),
                    0.0,
                )
                or 0.0
                for m in metrics
            ]
            axis.bar([x + (i - (len(columns) - 1) / 2) * bar for x in range(len(metrics))], values, bar, label=column)
        axis.set_xticks(range(len(metrics)), [m.replace("_", " ") for m in metrics], fontsize=8)
        axis.set_xlim(-0.6, max(len(metrics), 3) - 0.4)  # a lone metric keeps a normal bar width
        axis.set_ylim(0, 1.05)
        axis.set_title(task, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    if columns:
        axes[0].legend(fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            figure.savefig(out, format="png", dpi=110)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _number(value: Any, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _write_atomic(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
