"""`pue-bench`: latency and PMEB accuracy of bundles next to the PyTorch reference. Thin: parse, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pue.cli.common import console, handle_errors, print_json, progress_printer, set_debug, styled
from pue.errors import PueError

app = typer.Typer(
    name="pue-bench",
    add_completion=False,
    no_args_is_help=True,
    help="Benchmark bundles against the PyTorch reference: latency (pue-bench latency), accuracy (pue-bench pmeb), "
    "and where a bundle's time goes (pue-bench profile).",
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")) -> None:
    set_debug(debug)


@app.command("latency")
@handle_errors
def latency(
    bundles: list[Path] = typer.Argument(..., help="Bundle directories, each run on its own backend."),
    reference: Path = typer.Option(None, "--reference", help="The bundles' source checkpoint, run in PyTorch."),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes", help="Comma-separated batch sizes."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed batches per batch size."),
    iters: int = typer.Option(10, "--iters", help="Timed batches per batch size."),
    rounds: int = typer.Option(
        1, "--rounds", help="Run every worker this many times (alternating order); each row keeps its fastest round."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    backends: str = typer.Option(
        "auto",
        "--backends",
        help="Comma-separated backends each bundle runs on, e.g. auto,openvino (auto: the one Embedder.load picks); "
        "a backend that cannot run a bundle is noted with the reason.",
    ),
    threads: int = typer.Option(None, "--threads", help="Threads per worker (default: the library's own)."),
    reference_precisions: str = typer.Option(
        None,
        "--reference-precisions",
        callback=lambda value: _reference_precisions(value),
        help="Reference rows, e.g. fp32,bf16 (default: fp32 + bf16 on CPUs with native bf16, fp32 + fp16 on CUDA).",
    ),
    images: list[Path] = typer.Option(
        None, "--images", help="Image files or folders to use instead of the shipped held-out patches."
    ),
    patches_per_slide: int = typer.Option(10_000, "--patches-per-slide", help="Patches of one whole slide."),
    images_per_row: int = typer.Option(
        1, "--images-per-row", min=1, help="Rows of several images: each row embeds this many images as one query."
    ),
    no_peaks: bool = typer.Option(False, "--no-peaks", help="Skip measuring this machine's matmul peaks."),
    timeout: float = typer.Option(None, "--timeout", help="Seconds each worker may run before it is stopped."),
    report: Path = typer.Option(None, "--report", help="Directory for report.json, report.md and latency.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing, non-empty report directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Latency, throughput, memory and distance to the matmul limit of each bundle and of the reference."""
    _require_extras("pue-bench latency", report, reference)
    _require_backends(_str_list(backends), device)
    from pue.benchmarks.latency import run_latency
    from pue.benchmarks.report import check_report_dir, write_latency_report

    if report is not None:
        check_report_dir(report, overwrite)  # before minutes of measuring, not after
    err = console()
    result = run_latency(
        bundles,
        reference=reference,
        batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
        warmup=warmup,
        iters=iters,
        device=device,
        threads=threads,
        reference_precisions=_str_list(reference_precisions) if reference_precisions else None,
        images=_expand_images(images) if images else None,
        patches_per_slide=patches_per_slide,
        peaks=not no_peaks,
        timeout_s=timeout,
        rounds=rounds,
        images_per_row=images_per_row,
        backends=_str_list(backends),
        progress=progress_printer(err),
    )
    if report is not None:
        written = write_latency_report(result, report, overwrite=overwrite)
        err.print(f"wrote {', '.join(str(path) for path in written)}")
    if as_json:
        print_json(result)
    else:
        _print_latency(result)
    failed = [row for row in result["results"] if row.get("error")]
    if failed:
        names = sorted({f"{row['name']} (batch {row['batch_size']})" for row in failed})
        raise PueError(
            f"{len(failed)} of {len(result['results'])} rows failed: {', '.join(names)}",
            f"first error: {failed[0]['error']}",
        )


@app.command("pmeb")
@handle_errors
def pmeb(
    bundles: list[Path] = typer.Argument(None, help="Bundle directories to evaluate."),
    data: Path = typer.Option(
        ..., "--data", help="Folder with one sub-folder (task.json + data) per task, or 'pmeb-mini' (shipped)."
    ),
    reference: Path = typer.Option(None, "--reference", help="The bundles' source checkpoint, run in PyTorch."),
    tasks: str = typer.Option(None, "--tasks", help="Comma-separated task names (default: every task found)."),
    report: Path = typer.Option(None, "--report", help="Directory for report.json, report.md and pmeb.png."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Where embeddings are cached between runs."),
    embeddings: list[Path] = typer.Option(
        None, "--embeddings", help="Score saved embeddings (HOMIE's npz layout) instead of bundles; repeatable."
    ),
    embeddings_output: Path = typer.Option(
        None, "--embeddings-output", help="Save every run's embeddings as DIR/<run>/<task>.npz (HOMIE's layout)."
    ),
    homie_ties: str = typer.Option(
        "cuda", "--homie-ties", help="torch.topk's tie order for HOMIE's metrics: cuda (HOMIE's runs) or cpu."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing, non-empty report or embeddings-output directory."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """PMEB retrieval, zero-shot, composed retrieval and multiple choice: each bundle next to the reference,
    pue's metrics and HOMIE's; or saved embeddings (--embeddings FILE.npz) scored the same way."""
    if embeddings:
        from pue.extras import require_extras

        require_extras(["bench"] if report is not None else [], "pue-bench pmeb --embeddings")
    else:
        _require_extras("pue-bench pmeb", report, reference)
    try:
        from pue.benchmarks.pmeb.runner import run_pmeb
    except ImportError as exc:
        raise PueError(f"the PMEB harness is not available in this installation ({exc})") from exc
    from pue.benchmarks.report import check_report_dir

    if report is not None:
        check_report_dir(report, overwrite)
    if embeddings_output is not None:
        check_report_dir(embeddings_output, overwrite)
    if str(data) == "pmeb-mini" and not data.exists():
        from pue.benchmarks.pmeb import pmeb_mini_dir

        data = pmeb_mini_dir()
    err = console()
    # With a report directory the harness rewrites report.json / report.md after every finished task (a
    # failed or interrupted run keeps what finished) and writes the full report with pmeb.png at the end.
    result = run_pmeb(
        list(bundles or []),
        data,
        reference=reference,
        tasks=_str_list(tasks) if tasks else None,
        report_dir=report,
        cache_dir=cache_dir,
        device=device,
        progress=progress_printer(err),
        embeddings=list(embeddings or []),
        embeddings_output=embeddings_output,
        tie_order=homie_ties,
    )
    if report is not None:
        err.print(f"wrote the PMEB report to {report}")
    if embeddings_output is not None:
        err.print(f"wrote the embeddings to {embeddings_output}")
    if as_json:
        print_json(result)
    else:
        _print_pmeb(result)


@app.command("profile")
@handle_errors
def profile(
    bundle: Path = typer.Argument(..., help="Bundle directory (run on the CPU)."),
    backend: str = typer.Option(
        "onnxruntime", "--backend", help="onnxruntime (its profiler) or openvino (per-layer performance counters)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Image rows per batch."),
    runs: int = typer.Option(1, "--runs", help="Profiled runs per graph (after one untimed run)."),
    output: Path = typer.Option(None, "-o", "--output", help="Write the profile as JSON to this file."),
    top: int = typer.Option(12, "--top", help="Op types shown per graph."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON on stdout."),
) -> None:
    """Where a bundle's time goes: the backend's profiler over one batch, summed per op type and graph."""
    import json

    from pue.benchmarks.profile import profile_bundle

    if output is not None and output.exists() and not overwrite:
        raise PueError(f"'{output}' already exists", "pass --overwrite to replace it")
    result = profile_bundle(bundle, batch_size=batch_size, runs=runs, backend=backend)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        partial.replace(output)
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    out = console()
    for name, graph in result["graphs"].items():
        table = Table(
            title=f"{name}: {graph['wall_ms']:.0f} ms per batch of {result['batch_size']} "
            f"({result['precision']} on {result['backend']}, kernels {graph['kernel_ms']:.0f} ms)"
        )
        openvino = "matmuls" in graph  # OpenVINO's counters name each kernel's precision
        columns = ("op type", "ms", "share", "nodes") + (("int8 ms",) if openvino else ()) + ("kernels",)
        for column in columns:
            table.add_column(column, justify="left" if column in ("op type", "kernels") else "right")
        for op in graph["ops"][:top]:
            kernels = ", ".join(op.get("kernels", []))
            int8 = (f"{op['int8_ms']:.1f}",) if openvino else ()
            table.add_row(op["op_type"], f"{op['ms']:.1f}", f"{op['share']:.1%}", str(op["nodes"]), *int8, kernels)
        out.print(table)
        if openvino:
            matmuls = graph["matmuls"]
            out.print(
                f"{name}: matmul layers (FullyConnected[Compressed], Convolution, MatMul) {matmuls['ms']:.0f} ms, "
                f"{matmuls['int8_share']:.1%} of it in kernels the counters name int8 ({matmuls['int8_layers']} of "
                f"{matmuls['layers']} layers)"
            )
            if matmuls.get("compressed_layers"):
                out.print(
                    f"{name}: {matmuls['compressed_layers']} FullyConnectedCompressed layers hold int8 weights whose "
                    "activations OpenVINO quantizes at run time where the CPU has int8 dot products (VNNI, AMX); "
                    "its counters name their kernel f32"
                )


# ------------------------------------------------------------------------------------------------ printing


def _require_extras(command: str, report: Path | None, reference: Path | None) -> None:
    """Before any work: bundles run in onnxruntime; a report draws its plot (bench); a reference needs torch."""
    from pue.extras import require_extras

    needed = ["cpu"] + (["bench"] if report is not None else []) + (["export"] if reference is not None else [])
    what = command + (" --report" if report is not None else "") + (" --reference" if reference is not None else "")
    require_extras(needed, what)


def _require_backends(backends: list[str], device: str) -> None:
    """Every backend named in --backends is registered and installed, before any work."""
    from pue.extras import require_extras
    from pue.runtime.backends.base import parse_device
    from pue.runtime.backends.registry import AUTO, backend_spec

    if not backends:
        raise PueError("--backends names no backend", "e.g. --backends auto,openvino")
    parsed = parse_device(device)
    for name in backends:
        if name != AUTO:
            require_extras([backend_spec(name).extra_for(parsed)], f"pue-bench latency --backends {name}")


def _print_latency(result: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    out = console(stderr=False)
    table = Table(title="pue-bench latency (per batch; speed-ups over the PyTorch reference)")
    for column in (
        "name",
        "backend",
        "precision",
        "batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "items/s",
        "× fp32 ref",
        "× best ref",
        "peak MB",
        "% peak",
        "min/slide",
    ):
        table.add_column(column, justify="left" if column in ("name", "backend", "precision") else "right")
    for row in result["results"]:
        if row.get("error"):
            table.add_row(
                row["name"],
                row["backend"],
                row["precision"],
                str(row["batch_size"]),
                styled("failed", "red"),
                *[""] * 8,
            )
            continue
        table.add_row(
            row["name"],
            row["backend"],
            row["precision"],
            str(row["batch_size"]),
            f"{row['p50_ms']:.1f}",
            f"{row['p90_ms']:.1f}",
            f"{row['p99_ms']:.1f}",
            f"{row['items_per_s']:.3g}",
            _maybe(row["speedup_vs_reference"], "{:.2f}×"),
            _maybe(row["speedup_vs_best_reference"], "{:.2f}×"),
            f"{row['peak_memory_mb']:.0f}",
            _maybe(row.get("peak_fraction"), "{:.1%}"),
            _maybe(row.get("minutes_per_slide"), "{:.3g}"),
        )
    out.print(table)
    peaks = result.get("peaks") or {}
    measured = [
        f"{key} {peaks[key]['gflops']:,.0f}"
        for key in ("fp32", "bf16", "fp16", "int8")
        if isinstance(peaks.get(key), dict) and peaks[key].get("gflops")
    ]
    if measured:
        out.print(f"matmul peaks here (GFLOP/s, int8 GOP/s): {', '.join(measured)}")
    slide = result["settings"]["patches_per_slide"]
    for model in result.get("models", []):
        flops = model["flops"]
        out.print(
            f"{model['source_checkpoint']}: {flops['total'] / 1e9:,.3g} GFLOP per patch "
            f"(vision {flops['vision'] / 1e9:,.3g}, decoder {flops['decoder'] / 1e9:,.3g} over "
            f"{flops['sequence_length']} tokens; from the {flops['source']})"
        )
        cards = Table(title=f"best case per GPU at datasheet peak, {slide:,} patches per slide")
        for column in ("GPU", "FP16/BF16 TFLOPS", "min/slide", "INT8 TOPS", "min/slide (int8)"):
            cards.add_column(column, justify="left" if column == "GPU" else "right")
        for card in model["gpu_best_case"]:
            cards.add_row(
                card["gpu"],
                f"{card['fp16_tflops']:g}",
                f"{card['minutes_per_slide_fp16']:.3g}",
                f"{card['int8_tops']:g}",
                f"{card['minutes_per_slide_int8']:.3g}",
            )
        out.print(cards)
    for note in result.get("notes", []):
        out.print(Text.assemble(("note: ", "yellow"), str(note)))


def _print_pmeb(result: dict[str, Any]) -> None:
    from rich.table import Table

    rows = result.get("results", []) if isinstance(result, dict) else []
    table = Table(title="pue-bench pmeb")
    columns = (
        "name",
        "task",
        "meta_task",
        "metric",
        "homie_name",
        "value",
        "reference_value",
        "delta",
        "prediction_agreement",
        "mean_cosine_vs_reference",
    )
    for column in columns:
        table.add_column(
            column, justify="right" if column not in ("name", "task", "meta_task", "metric", "homie_name") else "left"
        )
    for row in rows:
        table.add_row(*[_cell(row.get(column)) for column in columns])
    console(stderr=False).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _maybe(value: Any, template: str) -> str:
    return "–" if value is None else template.format(value)


# ------------------------------------------------------------------------------------------------ parsing


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


REFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")


def _reference_precisions(text: str | None) -> str | None:
    """Validated while the command line is parsed (exit 2), like every option with a fixed set of values."""
    if text is None:
        return None
    unknown = [p for p in _str_list(text) if p not in REFERENCE_PRECISIONS]
    if unknown or not _str_list(text):
        raise typer.BadParameter(f"{text!r}: comma-separated values among {', '.join(REFERENCE_PRECISIONS)}")
    return text


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in _str_list(text)]
    except ValueError as exc:
        raise PueError(f"{option} takes comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise PueError(f"{option} takes positive integers, got {text!r}")
    return values


def _expand_images(paths: list[Path]) -> list[Path]:
    """Files as given; folders become their image files, sorted."""
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            images.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            images.append(path)
        else:
            raise PueError(f"--images path '{path}' does not exist")
    if not images:
        raise PueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in paths]}")
    return images


def main() -> None:
    app()


if __name__ == "__main__":
    main()
