"""`pue-export`: tiny checkpoints, ONNX bundles, inspection. Thin: parse, call the library, print."""

from __future__ import annotations

from pathlib import Path

import typer

from pue.choices import (
    ExportDtype,
    Exporter,
    HardwareCompat,
    OutlierGain,
    TinyArchitecture,
    TinyPreset,
)
from pue.cli.common import (
    GATE_MEAN_OPTION,
    GATE_MIN_OPTION,
    GATE_TOP1_OPTION,
    HELDOUT_OPTION,
    console,
    handle_errors,
    print_json,
    progress_printer,
    set_debug,
)
from pue.cli.quantize_commands import floor, outliers, quantize

app = typer.Typer(
    name="pue-export",
    add_completion=False,
    no_args_is_help=True,
    help="Convert an MLLM embedding checkpoint into verified ONNX / FP16 / INT8 / TensorRT bundles.",
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")) -> None:
    set_debug(debug)


@app.command("tiny-model")
@handle_errors
def tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
    arch: TinyArchitecture = typer.Option(TinyArchitecture.LLAVA_NEXT.value, "--arch", help="Architecture."),
    preset: TinyPreset = typer.Option(TinyPreset.CI.value, "--preset", help="Size and geometry preset."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    outlier_gain: OutlierGain = typer.Option(
        OutlierGain.G100.value, "--outlier-gain", help="Norm gain of the gains-few / gains-all presets."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Build a tiny real HF checkpoint (random weights, trained tokenizer) for tests and demos."""
    from pue.export.tiny_models import build_tiny_model

    path = build_tiny_model(
        out, arch=arch.value, preset=preset.value, seed=seed, overwrite=overwrite, outlier_gain=float(outlier_gain)
    )
    console().print(f"wrote {arch}/{preset} checkpoint to {path}")


@app.command("onnx")
@handle_errors
def onnx(
    checkpoint: Path = typer.Argument(..., help="Local checkpoint directory (save_pretrained layout)."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle directory to write."),
    exporter: Exporter = typer.Option(Exporter.TORCHSCRIPT.value, "--exporter", help="ONNX exporter."),
    opset: int = typer.Option(None, "--opset", help="ONNX opset (default 17 torchscript, 18 dynamo)."),
    tile_size: int = typer.Option(224, "--tile-size", help="Patch size the bundle is built for."),
    recipe: str = typer.Option(
        None,
        "--recipe",
        help="recipe.json, or a shipped recipe by name: e5v (default), gme, homie, qwen3_vl_embedding.",
    ),
    processor: Path = typer.Option(
        None, "--processor", help="Folder to read the processor (tokenizer, image processor, chat template) from."
    ),
    embedding_dim: int = typer.Option(
        None, "--embedding-dim", help="Matryoshka output dimension, where the recipe allows it (default: full)."
    ),
    dtype: ExportDtype = typer.Option(
        ExportDtype.FLOAT32.value, "--dtype", help="Weights of the root bundle (float16 halves memory for 8 B models)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda: where the reference and its gate run."),
    heldout: Path = typer.Option(
        None, "--heldout", help="Folder of held-out patches for the parity gate (default: the shipped ones)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export a checkpoint to a bundle of two ONNX graphs and gate it against the PyTorch reference."""
    from pue.extras import require_extras

    require_extras(["export", "cpu"], "pue-export onnx (export, then the parity gate in onnxruntime)")
    from pue.errors import GateFailedError
    from pue.export.onnx_bundle import export_onnx_bundle

    out = console()
    try:
        result = export_onnx_bundle(
            checkpoint,
            output,
            exporter=exporter.value,
            opset=opset,
            tile_size=tile_size,
            recipe=recipe,
            dtype=dtype.value,
            device=device,
            overwrite=overwrite,
            progress=progress_printer(out),
            processor=processor,
            embedding_dim=embedding_dim,
            heldout=heldout,
        )
    except GateFailedError as exc:
        _print_gate(out, exc.report["gate"])
        raise
    if as_json:
        print_json(
            {
                "bundle": str(result.bundle),
                "plan": result.plan.to_dict(),
                "gate": result.gate.to_dict(),
                "timings": result.timings,
            }
        )
    else:
        _print_gate(out, result.gate.to_dict())
        out.print(f"wrote {result.bundle}  ({', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())})")


def _print_gate(out: object, gate: dict) -> None:
    from pue.fidelity import print_gate

    print_gate(out, gate, title="parity gate (bundle via runtime vs PyTorch reference)")


app.command("quantize")(quantize)
app.command("outliers")(outliers)
app.command("floor")(floor)


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


@app.command("trt")
@handle_errors
def trt(
    bundle: Path = typer.Argument(..., help="Parent bundle: fp32, fp16, or int8 quantized with --target tensorrt."),
    output: Path = typer.Option(..., "-o", "--output", help="Engine bundle directory to write."),
    batch: str = typer.Option("1:8:32", "--batch", help="MIN:OPT:MAX batch of the optimisation profiles."),
    max_seq: int = typer.Option(
        None,
        "--max-seq",
        help="Longest token sequence the decoder engine accepts (default: a prompt of --max-images images + 512, "
        "rounded up to 64).",
    ),
    max_images: int = typer.Option(
        1, "--max-images", min=1, help="Most images one row may hold (rows of several images: a region, a stain pair)."
    ),
    timing_cache: Path = typer.Option(
        None,
        "--timing-cache",
        help="TensorRT timing cache file: read if it exists, saved after the build (makes rebuilds much faster).",
    ),
    workspace: float = typer.Option(
        None, "--workspace", help="Builder workspace limit in GB (default: TensorRT's, the GPU's memory)."
    ),
    version_compatible: bool = typer.Option(
        False,
        "--version-compatible",
        help="Engines that also run on later TensorRT versions (they carry a lean runtime; may be slower).",
    ),
    hardware_compat: HardwareCompat = typer.Option(
        HardwareCompat.NONE.value,
        "--hardware-compat",
        help="Portability of the engines (ampere_plus runs on any sm_80+ GPU; may be slower).",
    ),
    device: str = typer.Option("cuda", "--device", help="GPU to build on and gate with: cuda or cuda:N."),
    heldout: Path = HELDOUT_OPTION,
    gate_mean: float = GATE_MEAN_OPTION,
    gate_min: float = GATE_MIN_OPTION,
    gate_top1: float = GATE_TOP1_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Build TensorRT engines (one per graph) on this GPU and gate them against the parent bundle."""
    from pue.errors import GateFailedError
    from pue.export.tensorrt.build import TrtOptions, build_engine_bundle
    from pue.export.tensorrt.profiles import parse_batch
    from pue.export.tensorrt.report import print_engine_result
    from pue.fidelity import FidelityThresholds, print_gate

    out = console()
    thresholds = FidelityThresholds.with_overrides(gate_mean, gate_min, gate_top1)
    options = TrtOptions(
        batch=parse_batch(batch),
        max_seq=max_seq,
        max_images=max_images,
        timing_cache=timing_cache,
        workspace_gb=workspace,
        version_compatible=version_compatible,
        hardware_compat=hardware_compat.value,
        device=device,
    )
    try:
        result = build_engine_bundle(
            bundle,
            output,
            options,
            overwrite=overwrite,
            heldout=heldout,
            thresholds=thresholds,
            progress=progress_printer(out),
        )
    except GateFailedError as exc:
        print_gate(out, exc.report["gate"])
        raise
    if as_json:
        print_json(
            {
                "bundle": str(result.bundle),
                "gate": result.gate.to_dict(),
                "timings": result.timings,
                "engines": {name: meta.to_dict() for name, meta in result.engines.items()},
            }
        )
    else:
        print_engine_result(out, result)


@app.command("demo")
@handle_errors
def demo(
    workdir: Path = typer.Option(Path("pue-demo"), "--workdir", help="Where checkpoint, bundles and reports go."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing demo directory."),
    iters: int = typer.Option(5, "--iters", help="Timed iterations per batch size in the latency benchmark."),
) -> None:
    """Tiny checkpoint → FP32 bundle → INT8 bundles → latency and pmeb-mini reports, offline, with a summary."""
    from pue.extras import require_extras

    require_extras(["export", "cpu", "bench"], "pue-export demo (export, quantize, latency and PMEB reports)")
    from rich.table import Table

    from pue.demo import run_demo

    out = console()
    result = run_demo(workdir, overwrite=overwrite, iters=iters, progress=out.print)
    table = Table(title="pue demo: tiny llava_next checkpoint, batch 8, this machine")
    for column in ("name", "precision", "gate", "p50 ms", "items/s", "×ref", "PMEB agree"):
        table.add_column(column)
    for row in result.summary_rows():
        table.add_row(
            str(row["name"]).removeprefix("bundle-"),
            str(row["precision"]),
            str(row["gate"]),
            _fmt(row["p50_ms"], 1),
            _fmt(row["items_per_s"], 2),
            _fmt(row["speedup_vs_reference"], 2),
            "-" if row["pmeb_prediction_agreement"] is None else f"{row['pmeb_prediction_agreement']:.1%}",
        )
    out.print(table)
    out.print(
        f"reports: {result.workdir / 'reports' / 'latency' / 'report.md'}, "
        f"{result.workdir / 'reports' / 'pmeb' / 'report.md'}"
    )
    out.print("Random tiny weights: these numbers show the pipeline works, not how a trained model performs.")


def _fmt(value: object, digits: int) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
