"""Latency reports: `report.json` (the numbers), `report.md` (the tables a person reads), `latency.png` (the plot).

`report.json` holds `schema_version`, `kind`, `environment`, `settings`, `peaks` (this machine's matmul peaks
from the same run), `models` (FLOPs per patch per source checkpoint, with the datasheet best case per GPU),
`results` (one row per model and batch size; docs/architecture.md lists the fields) and `notes`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pue.errors import MissingDependencyError, OutputExistsError, PueError

SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "report.md", "latency.png")
REQUIRED_ROW_FIELDS = (
    "name",
    "backend",
    "precision",
    "batch_size",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "items_per_s",
    "peak_memory_mb",
    "device",
    "speedup_vs_reference",
    "speedup_vs_best_reference",
)


def check_report_dir(directory: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing, non-empty directory unless `overwrite` (checked before the benchmark starts)."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise PueError(f"report path '{path}' exists and is not a directory", "choose another --report path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(str(path))
    return path


def write_latency_report(report: dict[str, Any], directory: str | Path, overwrite: bool = False) -> list[Path]:
    """Write report.json, report.md and latency.png into `directory` (each file atomically)."""
    path = check_report_dir(directory, overwrite)
    check_rows(report.get("results", []))
    path.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path, plot_path = (path / name for name in REPORT_FILES)
    _write_text(json_path, json.dumps(report, indent=2, default=_json_default) + "\n")
    _write_text(markdown_path, render_markdown(report))
    plot_latency(report, plot_path)
    return [json_path, markdown_path, plot_path]


def check_rows(rows: list[dict[str, Any]]) -> None:
    """Every row carries the contract's fields (values may be null on a failed row)."""
    for index, row in enumerate(rows):
        missing = [name for name in REQUIRED_ROW_FIELDS if name not in row]
        if missing:
            raise PueError(f"result row {index} ({row.get('name', '?')}) lacks the fields {missing}")


# ------------------------------------------------------------------------------------------------ Markdown


def render_markdown(report: dict[str, Any]) -> str:
    rows = report.get("results", [])
    settings = report.get("settings", {})
    lines = ["# pue-bench latency", ""]
    lines += _environment_lines(report.get("environment", {}))
    lines += [
        f"Settings: batch sizes {settings.get('batch_sizes')}, {settings.get('warmup')} warm-up and "
        f"{settings.get('iters')} timed batches per size, threads {settings.get('threads') or 'default'}, "
        f"device {settings.get('device')}, {settings.get('images')} images ({settings.get('image_source')}) read "
        "from disk for every batch (decoding is part of preprocess); 1-minute load average "
        f"{settings.get('load_average_before', '?')} before the run, {settings.get('load_average_after', '?')} after.",
        "",
        "## Results",
        "",
        "| name | backend | precision | device | batch | p50 ms | p90 ms | p99 ms | items/s | × fp32 ref | "
        "× best ref | peak MB | % of peak | min/slide |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['backend']} | {row['precision']} | {row['device']} | {row['batch_size']} | "
            f"{_num(row['p50_ms'])} | {_num(row['p90_ms'])} | {_num(row['p99_ms'])} | {_num(row['items_per_s'], 3)} | "
            f"{_times(row['speedup_vs_reference'])} | {_times(row['speedup_vs_best_reference'])} | "
            f"{_num(row['peak_memory_mb'], 0)} | {_percent(row.get('peak_fraction'))} | "
            f"{_num(row.get('minutes_per_slide'), 1)} |"
        )
    staged = [row for row in rows if row.get("stage_ms")]
    if staged:
        lines += [
            "",
            "Stage times, ms per batch (the reference's preprocess includes tokenizing):",
            "",
            "| name | batch | preprocess | tokenize | vision | decoder |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in staged:
            stages = row["stage_ms"]
            lines.append(
                f"| {row['name']} | {row['batch_size']} | {_num(stages.get('preprocess'))} | "
                f"{_num(stages.get('tokenize'))} | {_num(stages.get('vision'))} | "
                f"{_num(stages.get('decoder'))} |"
            )
    failed = [row for row in rows if row.get("error")]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- {row['name']} (batch {row['batch_size']}): {row['error']}" for row in failed]
    lines += ["", "## Distance to the limit", ""]
    lines += _peak_lines(report.get("peaks"))
    for model in report.get("models", []):
        lines += _model_lines(model, settings.get("patches_per_slide"))
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def _environment_lines(environment: dict[str, Any]) -> list[str]:
    cpu = environment.get("cpu", {})
    gpus = ", ".join(f"{g.get('name')} (driver {g.get('driver')})" for g in environment.get("gpus", [])) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in environment.get("versions", {}).items() if v)
    return [
        f"Machine: {cpu.get('model', '?')}, {cpu.get('usable_cores', '?')} cores "
        f"({', '.join(cpu.get('flags', [])) or 'no listed matrix extensions'}), "
        f"{environment.get('memory_gb', '?')} GB RAM; GPU: {gpus}.",
        "",
        f"Software: {versions}.",
        "",
    ]


def _peak_lines(peaks: dict[str, Any] | None) -> list[str]:
    if not peaks:
        return ["Matmul peaks were not measured (--no-peaks), so rows carry no peak fraction.", ""]
    parts = []
    for key in ("fp32", "fp32_torch", "bf16", "fp16", "int8"):
        entry = peaks.get(key)
        if isinstance(entry, dict) and entry.get("gflops"):
            unit = "GOP/s" if key == "int8" else "GFLOP/s"
            parts.append(f"{key} {entry['gflops']:,.0f} {unit} ({entry['how']})")
    return [
        f"This machine's matmul peaks, measured in this run with {peaks.get('threads') or 'default'} threads: "
        + "; ".join(parts)
        + ". Each row's % of peak is its FLOPs per second over the peak of its precision "
        "(fp16 on CPU counts against fp32: onnxruntime computes it in fp32).",
        "",
    ]


def _model_lines(model: dict[str, Any], patches_per_slide: int | None) -> list[str]:
    flops = model["flops"]
    lines = [
        f"**{model['source_checkpoint']}** ({model['tile_size']} px tiles): one patch costs "
        f"{_flop(flops['total'])} = vision {_flop(flops['vision'])} ({flops['crops']} crops) + decoder "
        f"{_flop(flops['decoder'])} ({flops['sequence_length']} tokens, {flops['image_tokens']} of them image "
        f"tokens), counted from the {'checkpoint config' if flops['source'] == 'config' else 'ONNX graphs'}.",
        "",
        f"Best case on common GPUs, every FLOP at the datasheet's dense tensor-core peak, {patches_per_slide:,} "
        "patches per slide (real kernels reach a fraction of this):",
        "",
        "| GPU | FP16/BF16 TFLOPS | patches/s | min/slide | INT8 TOPS | patches/s | min/slide |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for card in model.get("gpu_best_case", []):
        lines.append(
            f"| {card['gpu']} | {card['fp16_tflops']:g} | {_sig(card['patches_per_s_fp16'])} | "
            f"{_sig(card['minutes_per_slide_fp16'])} | {card['int8_tops']:g} | "
            f"{_sig(card['patches_per_s_int8'])} | {_sig(card['minutes_per_slide_int8'])} |"
        )
    sources = "; ".join(f"{card['gpu']}: {card['source']}" for card in model.get("gpu_best_case", []))
    return lines + ["", f"Sources: {sources}.", ""]


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _sig(value: Any) -> str:
    """Three significant digits, for numbers spanning many magnitudes (tiny test models to 8 B)."""
    return "–" if value is None else f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"


def _times(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _flop(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value:,.0f} FLOP"


# ------------------------------------------------------------------------------------------------ plot


def plot_latency(report: dict[str, Any], path: str | Path) -> Path:
    """Throughput bars: one group per row name, one bar per batch size (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "bench", "the latency plot") from exc
    rows = [row for row in report.get("results", []) if row.get("items_per_s")]
    names = list(dict.fromkeys(row["name"] for row in report.get("results", [])))
    sizes = sorted({row["batch_size"] for row in report.get("results", [])})
    figure, axes = plt.subplots(figsize=(max(6.0, 1.4 * len(names) + 2), 4.5))
    width = 0.8 / max(len(sizes), 1)
    for offset, size in enumerate(sizes):
        values = [
            next((r["items_per_s"] for r in rows if r["name"] == n and r["batch_size"] == size), 0.0) for n in names
        ]
        positions = [i + (offset - (len(sizes) - 1) / 2) * width for i in range(len(names))]
        bars = axes.bar(positions, values, width, label=f"batch {size}")
        axes.bar_label(bars, labels=[f"{v:.3g}" if v else "failed" for v in values], fontsize=7, padding=2)
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
    axes.set_ylabel("patches per second")
    device = report.get("settings", {}).get("device", "")
    cpu = report.get("environment", {}).get("cpu", {}).get("model", "")
    axes.set_title(f"pue-bench latency: throughput ({device}{', ' + cpu if cpu and device == 'cpu' else ''})")
    axes.legend()
    figure.tight_layout()
    out = Path(path)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".png", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        figure.savefig(temporary, dpi=120)
        os.replace(temporary, out)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------------ files


def _write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8"
    ) as handle:
        handle.write(text)
        temporary = Path(handle.name)
    os.replace(temporary, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
