"""Console output of `pue-export trt`: the engines built and the gate's measurements (rich tables)."""

from __future__ import annotations

from typing import Any

from pue.fidelity import print_gate


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
    print_gate(console, result.gate.to_dict())
    console.print(f"wrote {result.bundle}  ({', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())})")
