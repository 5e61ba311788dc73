"""What scripts/gpu_check.py records and prints: one row per backend and precision, the run (environment, steps,
rows; its JSON), the plain-text table and the JSON written after every step. Imported by the script from its own
folder (`python scripts/gpu_check.py` puts scripts/ first on the path)."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    name: str
    backend: str
    precision: str
    device: str
    status: str = "planned"  # planned | ran | failed | not run | dry-run
    reason: str = ""
    mean_cosine: float | None = None
    min_cosine: float | None = None
    top1: float | None = None
    centered_mean_cosine: float | None = None
    gate_passed: bool | None = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # {"1": {"p50_ms":..., "items_per_s":...}}
    seconds: float = 0.0


@dataclass
class Run:
    args: argparse.Namespace
    started: float = field(default_factory=time.perf_counter)
    environment: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def not_run(self) -> list[dict[str, str]]:
        return [{"name": row.name, "reason": row.reason} for row in self.rows if row.status == "not run"]

    def to_dict(self) -> dict[str, Any]:
        failed = [row.name for row in self.rows if row.status == "failed"]
        failed += [step["name"] for step in self.steps if step["status"] == "failed"]
        return {
            "schema_version": 1,
            "dry_run": self.args.dry_run,
            "device": self.args.device,
            "elapsed_s": round(self.elapsed(), 1),
            "environment": self.environment,
            "steps": self.steps,
            "results": [asdict(row) for row in self.rows],
            "not_run": self.not_run(),
            "failed": failed,
            "passed": not failed,
        }


# --- output --------------------------------------------------------------------------------------------------


def cell(value: Any, digits: int = 5) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(run: Run) -> str:
    batches = [str(b) for b in run.args.batch_sizes]
    header = ["name", "device", "status", "mean cos", "min cos", "top1", "gate"]
    for batch in batches:
        header += [f"b{batch} p50 ms", f"b{batch} items/s"]
    lines = [header]
    for row in run.rows:
        cells = [
            row.name,
            row.device,
            row.status,
            cell(row.mean_cosine),
            cell(row.min_cosine),
            cell(row.top1, 3),
            cell(row.gate_passed),
        ]
        for batch in batches:
            measured = row.latency.get(batch, {})
            cells += [cell(measured.get("p50_ms"), 2), cell(measured.get("items_per_s"), 1)]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    notes = [f"  {row.name}: {row.status}: {row.reason}" for row in run.rows if row.reason]
    if notes:
        text += ["", "notes (what was not run, and why):", *notes]
    failed_steps = [f"  {s['name']}: {s.get('error', '')}" for s in run.steps if s["status"] == "failed"]
    if failed_steps:
        text += ["", "failed steps:", *failed_steps]
    return "\n".join(text)


def write_json(run: Run) -> None:
    if run.args.out is None:
        return
    out = Path(run.args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(run.to_dict(), indent=2, default=str) + "\n")
    os.replace(partial, out)
