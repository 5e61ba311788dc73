"""`pue-export`: tiny checkpoints, ONNX bundles, inspection. Thin: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path

import typer

from pue.cli.common import console, handle_errors, print_json, set_debug

app = typer.Typer(
    name="pue-export", add_completion=False, no_args_is_help=True,
    help="Convert an MLLM embedding checkpoint into verified ONNX / FP16 / INT8 / TensorRT bundles.",
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")) -> None:
    set_debug(debug)


@app.command("tiny-model")
@handle_errors
def tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
    arch: str = typer.Option("llava_next", "--arch", help="llava_next or llava."),
    preset: str = typer.Option("ci", "--preset", help="ci, e5v, outliers or bench."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Build a tiny real HF checkpoint (random weights, trained tokenizer) for tests and demos."""
    from pue.export.tiny_models import build_tiny_model

    path = build_tiny_model(out, arch=arch, preset=preset, seed=seed, overwrite=overwrite)
    console().print(f"wrote {arch}/{preset} checkpoint to {path}")


@app.command("onnx")
@handle_errors
def onnx(
    checkpoint: Path = typer.Argument(..., help="Local checkpoint directory (save_pretrained layout)."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle directory to write."),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (default) or dynamo."),
    opset: int = typer.Option(None, "--opset", help="ONNX opset (default 17 torchscript, 18 dynamo)."),
    tile_size: int = typer.Option(224, "--tile-size", help="Patch size the bundle is built for."),
    recipe: Path = typer.Option(None, "--recipe", help="recipe.json (default: E5-V recipe shipped with pue)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float16 (halves memory for 8 B models)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda: where the reference and its gate run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a checkpoint to a bundle of two ONNX graphs and gate it against the PyTorch reference."""
    from pue.export.onnx_bundle import export_onnx_bundle
    from pue.errors import GateFailedError

    out = console()
    try:
        result = export_onnx_bundle(
            checkpoint, output, exporter=exporter, opset=opset, tile_size=tile_size, recipe=recipe, dtype=dtype,
            device=device, overwrite=overwrite, progress=lambda message: out.print(f"[dim]·[/dim] {message}"),
        )
    except GateFailedError as exc:
        _print_gate(out, exc.report["gate"])
        raise
    if as_json:
        print_json({"bundle": str(result.bundle), "plan": result.plan.to_dict(), "gate": result.gate.to_dict(),
                    "timings": result.timings})
    else:
        _print_gate(out, result.gate.to_dict())
        out.print(f"wrote {result.bundle}  ({', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())})")


def _print_gate(out: object, gate: dict) -> None:
    from rich.table import Table

    table = Table(title="parity gate (bundle via runtime vs PyTorch reference)")
    for column in ("check", "metric", "value", "threshold", "result"):
        table.add_column(column)
    for check in gate["checks"]:
        sign = ">=" if check["higher_is_better"] else "<="
        table.add_row(check["name"], check["metric"], f"{check['value']:.3g}", f"{sign} {check['threshold']:g}",
                      "[green]pass[/green]" if check["passed"] else "[red]FAIL[/red]")
    out.print(table)  # type: ignore[attr-defined]
    out.print("PASSED" if gate["passed"] else "[red]FAILED[/red]")  # type: ignore[attr-defined]


@app.command("inspect")
@handle_errors
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and checks as JSON."),
) -> None:
    """Summarise a bundle and verify every file against its sha256."""
    from pue.export.inspect_bundle import describe_bundle

    summary = describe_bundle(bundle)
    if as_json:
        print_json(summary)
        return
    from pue.export.inspect_bundle import print_summary

    print_summary(console(), summary)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
