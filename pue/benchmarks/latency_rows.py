"""The rows of `pue-bench latency`: what one worker reported becomes one row per batch size, the best of several
rounds is kept, and each row gets its speed-ups over the PyTorch reference and its distance to the matmul limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pue.benchmarks.latency_worker import WorkerSpec
from pue.benchmarks.peaks import peak_for
from pue.errors import PueError

__all__ = [
    "WorkerOutcome",
    "add_limits",
    "add_speedups",
    "best_of_rounds",
    "latency_stats",
    "rows_from_outcome",
]


@dataclass
class WorkerOutcome:
    """What came back from one worker: its load line, the batch sizes it finished, and an error if it failed."""

    loaded: dict[str, Any] | None = None
    batches: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def best_of_rounds(per_round: list[list[dict[str, Any]]], order: list[str]) -> list[dict[str, Any]]:
    """Per (name, batch size), the round with the highest throughput (a failed round loses to any measured one);
    `round_items_per_s` keeps every round's throughput. Rows come out in `order`, then by batch size."""
    candidates: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for measured in per_round:
        for row in measured:
            candidates.setdefault((row["name"], row["batch_size"]), []).append(row)
    rows = []
    for key in sorted(candidates, key=lambda k: (order.index(k[0]), k[1])):
        rounds = candidates[key]
        best = dict(max(rounds, key=lambda r: r["items_per_s"] if r.get("items_per_s") is not None else -1.0))
        if len(rounds) > 1:
            best["round_items_per_s"] = [r.get("items_per_s") for r in rounds]
        rows.append(best)
    return rows


def latency_stats(latencies_ms: Sequence[float], batch_size: int) -> dict[str, float]:
    """Percentiles of the per-batch latency (linear interpolation) and throughput over the whole timed run."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise PueError(f"latencies must be positive and finite, got {list(latencies_ms)}")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(values.mean()),
        "items_per_s": float(batch_size * values.size / (values.sum() / 1000)),
    }


def rows_from_outcome(
    name: str, spec: WorkerSpec, outcome: WorkerOutcome, precision: str, backend: str
) -> list[dict[str, Any]]:
    """One row per requested batch size; a batch size the worker did not finish carries the worker's error."""
    loaded = outcome.loaded or {}
    finished = {batch["batch_size"]: batch for batch in outcome.batches}
    rows = []
    for batch_size in sorted(set(spec.batch_sizes)):
        row: dict[str, Any] = {
            "name": name,
            "backend": loaded.get("backend", backend),
            "precision": loaded.get("precision", precision),
            "batch_size": batch_size,
            "device": spec.device,
            "path": spec.path,
            "threads": loaded.get("threads"),
            "p50_ms": None,
            "p90_ms": None,
            "p99_ms": None,
            "mean_ms": None,
            "items_per_s": None,
            "peak_memory_mb": None,
            "peak_gpu_memory_mb": None,
            "stage_ms": None,
            "load_s": loaded.get("load_s"),
            "iters": spec.iters,
            "warmup": spec.warmup,
        }
        batch = finished.get(batch_size)
        if batch is None:
            row["error"] = outcome.error or "the worker reported no result for this batch size"
        else:
            row.update(latency_stats(batch["latencies_ms"], batch_size))
            row.update(
                peak_memory_mb=batch["peak_memory_mb"],
                peak_gpu_memory_mb=batch.get("peak_gpu_memory_mb"),
                stage_ms=batch["stage_ms"],
            )
        rows.append(row)
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_reference (over the fp32 PyTorch row of the same batch size) and speedup_vs_best_reference
    (over the fastest PyTorch row of that batch size); None where there is no such row."""
    for row in rows:
        same_batch = [
            r
            for r in rows
            if r["backend"] == "pytorch" and r["batch_size"] == row["batch_size"] and r.get("items_per_s")
        ]
        fp32 = next((r for r in same_batch if r["precision"] == "fp32"), None)
        best = max(same_batch, key=lambda r: r["items_per_s"], default=None)
        speed = row.get("items_per_s")
        row["speedup_vs_reference"] = speed / fp32["items_per_s"] if speed and fp32 else None
        row["speedup_vs_best_reference"] = speed / best["items_per_s"] if speed and best else None


def add_limits(rows: list[dict[str, Any]], peaks: dict[str, Any] | None, patches_per_slide: int) -> None:
    """achieved_gflops and peak_fraction (against this machine's peak of the row's precision class), and
    minutes_per_slide at the measured throughput."""
    for row in rows:
        speed, flops = row.get("items_per_s"), row.get("flops_per_item")
        patches_per_s = speed * row.get("images_per_row", 1) if speed else None  # a row of k images is k patches
        row["minutes_per_slide"] = patches_per_slide / patches_per_s / 60 if patches_per_s else None
        row["achieved_gflops"] = speed * flops / 1e9 if speed and flops else None
        peak = peak_for(peaks, row["precision"], row["device"])
        row["peak_gflops"] = peak
        row["peak_fraction"] = row["achieved_gflops"] / peak if row["achieved_gflops"] and peak else None
