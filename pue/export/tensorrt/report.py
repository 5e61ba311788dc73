"""Console output of `pue-export trt`: the engines built and the gate's measurements (rich tables)."""

from __future__ import annotations

from typing import Any


def print_fidelity(console: Any, gate: dict[str, Any]) -> None:
    from rich.table import Table

    overall, thresholds = gate["overall"], gate["thresholds"]
    table = Table(title=f"fidelity gate ({gate.get('compared', 'engines vs parent bundle')})")
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
            "[green]pass[/green]" if value >= threshold else "[red]FAIL[/red]",
        )
    table.add_row("centered mean cosine", f"{overall['centered_mean_cosine']:.5f}", "", "")
    for kind, values in gate.get("per_kind", {}).items():
        table.add_row(
            f"{kind} ({values['count']}) mean / min",
            f"{values['mean_cosine']:.5f} / {values['min_cosine']:.5f}",
            "",
            "",
        )
    console.print(table)
    if gate.get("note"):
        console.print(f"note: {gate['note']}")
    console.print("PASSED" if gate["passed"] else "[red]FAILED[/red]")


def print_engine_result(console: Any, result: Any) -> None:
    from rich.table import Table

    table = Table(title="TensorRT engines")
    for column in ("engine", "size", "build", "built on", "profile (min / opt / max)"):
        table.add_column(column)
    for meta in result.engines.values():
        profile = "\n".join(
            f"{tensor}: {list(s.min)} / {list(s.opt)} / {list(s.max)}" for tensor, s in meta.profiles.items()
        )
        table.add_row(
            meta.engine,
            f"{meta.engine_bytes / 2**20:.1f} MiB",
            f"{meta.build_seconds:.1f} s",
            meta.built_on.describe(),
            profile,
        )
    console.print(table)
    print_fidelity(console, result.gate.to_dict())
    console.print(f"wrote {result.bundle}  ({', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())})")
