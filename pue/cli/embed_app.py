"""`pue-embed`: embed whole slides (`slides`) or a scanner's output folder (`watch`), ask a slide in words
(`search`). Thin: parse, check, hand over
to `pue.embed`. Nothing heavy is imported at module level, so `pue-embed --help` loads no torch and no onnxruntime."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import typer

from pue.choices import Engine, FeatureDtype, FeatureFormat
from pue.cli.common import handle_errors, set_debug
from pue.errors import EXIT_USAGE

app = typer.Typer(
    name="pue-embed",
    add_completion=False,
    no_args_is_help=True,
    help="Embed every tissue tile of whole slides into TRIDENT-layout HDF5 (or parquet) files, resumably.",
)


@app.callback()
def _group() -> None:
    """Embed whole slides (`slides`), watch a scanner's output folder (`watch`), ask a slide in words (`search`)."""


@app.command()
@handle_errors
def slides(
    inputs: list[str] = typer.Argument(..., help="Slide files, folders, globs, or a CSV slide_id,path[,mpp]."),
    out: Path = typer.Option(..., "-o", "--out", help="Output root (TRIDENT layout below it)."),
    bundle: Path = typer.Option(..., "--bundle", help="The bundle to embed with."),
    name: str = typer.Option(None, "--name", help="Encoder name in the folder features_<name> (default: bundle dir)."),
    mag: float = typer.Option(None, "--mag", help="Target magnification (10x = 1 µm/px); default 20 without --mpp."),
    mpp: float = typer.Option(None, "--mpp", help="Target µm/px (instead of --mag)."),
    patch_size: int = typer.Option(None, "--patch-size", min=1, help="Tile side at the target (default: bundle's)."),
    overlap: int = typer.Option(0, "--overlap", min=0, help="Overlap of neighbouring tiles, in target pixels."),
    min_tissue: float = typer.Option(
        0.0, "--min-tissue", min=0.0, max=1.0, help="Keep tiles at least this much tissue (default: any overlap)."
    ),
    coords_from: Path = typer.Option(None, "--coords-from", help="TRIDENT or CLAM patches folder: embed those tiles."),
    fmt: FeatureFormat = typer.Option(FeatureFormat.H5, "--format", help="h5 (TRIDENT) or parquet."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.FLOAT32, "--dtype", help="Stored features dtype (HDF5)."),
    skip_errors: bool = typer.Option(False, "--skip-errors", help="Record a failed slide and go on."),
    assume_mpp: float = typer.Option(None, "--assume-mpp", help="µm/px of slides that record no resolution."),
    lock_timeout: float = typer.Option(300.0, "--lock-timeout", min=1.0, help="Seconds before a silent lock is stale."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Tiles per batch (default: the bundle's)."),
    prefetch: int = typer.Option(2, "--prefetch", min=1, help="Batches the reader thread may read ahead."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Runtime backend (auto picks the bundle's)."),
    thumbnails: bool = typer.Option(
        False, "--thumbnails", help="Also write <tiling>/thumbnails/<slide_id>.png: tissue mask and embedded tiles."
    ),
    threads: int = typer.Option(
        None, "--threads", min=1, help="CPU threads for the runtime (default: its own; with Ray: 1 per actor)."
    ),
    engine: Engine = typer.Option(Engine.LOCAL, "--engine", help="local (this process) or ray (a Ray cluster)."),
    ray_address: str = typer.Option(
        None, "--ray-address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: a local Ray."
    ),
    ray_actors: int = typer.Option(
        None, "--ray-actors", min=1, help="Embedding actors (default: (cluster CPUs - 1) / --threads, or its GPUs)."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """Embed every tissue tile of INPUTS into OUT/<mag>x_<ps>px_<ov>px_overlap/features_<name>/<slide_id>.h5."""
    options = _job_options(locals())
    from pue.cli.embed_run import run_slides

    raise typer.Exit(run_slides(inputs, options, json_output))


@app.command()
@handle_errors
def watch(
    folder: Path = typer.Argument(..., help="The folder the scanner writes slides into."),
    out: Path = typer.Option(..., "-o", "--out", help="Output root (TRIDENT layout below it)."),
    bundle: Path = typer.Option(..., "--bundle", help="The bundle to embed with."),
    settle: float = typer.Option(30.0, "--settle", min=0.0, help="Seconds a slide's files must stay unchanged."),
    poll: float = typer.Option(2.0, "--poll", min=0.05, help="Seconds between scans of the folder."),
    name: str = typer.Option(None, "--name", help="Encoder name in the folder features_<name> (default: bundle dir)."),
    mag: float = typer.Option(None, "--mag", help="Target magnification (10x = 1 µm/px); default 20 without --mpp."),
    mpp: float = typer.Option(None, "--mpp", help="Target µm/px (instead of --mag)."),
    patch_size: int = typer.Option(None, "--patch-size", min=1, help="Tile side at the target (default: bundle's)."),
    overlap: int = typer.Option(0, "--overlap", min=0, help="Overlap of neighbouring tiles, in target pixels."),
    min_tissue: float = typer.Option(
        0.0, "--min-tissue", min=0.0, max=1.0, help="Keep tiles at least this much tissue (default: any overlap)."
    ),
    fmt: FeatureFormat = typer.Option(FeatureFormat.H5, "--format", help="h5 (TRIDENT) or parquet."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.FLOAT32, "--dtype", help="Stored features dtype (HDF5)."),
    assume_mpp: float = typer.Option(None, "--assume-mpp", help="µm/px of slides that record no resolution."),
    lock_timeout: float = typer.Option(300.0, "--lock-timeout", min=1.0, help="Seconds before a silent lock is stale."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Tiles per batch (default: the bundle's)."),
    prefetch: int = typer.Option(2, "--prefetch", min=1, help="Batches the reader thread may read ahead."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Runtime backend (auto picks the bundle's)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for the runtime (default: its own)."),
    thumbnails: bool = typer.Option(
        False, "--thumbnails", help="Also write <tiling>/thumbnails/<slide_id>.png: tissue mask and embedded tiles."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout when stopped."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """Embed each new slide in FOLDER once it is complete, until SIGINT / SIGTERM. A bad slide is recorded and
    skipped (the watcher keeps running); a restart picks up where it stopped."""
    options = _job_options(locals())
    from pue.cli.embed_run import run_watch

    raise typer.Exit(run_watch(folder, settle, poll, options, json_output))


@app.command()
@handle_errors
def search(
    out: Path = typer.Argument(..., help="The output root of pue-embed slides (-o)."),
    slide: str = typer.Option(..., "--slide", help="The slide's id (its features file's name)."),
    bundle: Path = typer.Option(..., "--bundle", help="The bundle the slide's features were made with."),
    text: str = typer.Option(None, "--text", help="What to look for, in words (the recipe's text prompt)."),
    image: Path = typer.Option(None, "--image", help="A tile: alone, or with --text as a composed query."),
    top_k: int = typer.Option(16, "--top-k", min=1, help="Tiles on the contact sheet and in the JSON."),
    tiling: str = typer.Option(None, "--tiling", help="Which tiling folder, e.g. 20x_224px_0px_overlap."),
    name: str = typer.Option(None, "--name", help="Which features_<name> folder."),
    slide_file: Path = typer.Option(None, "--slide-file", help="The slide file, when it moved since embedding."),
    report: Path = typer.Option(None, "--report", help="Folder for the pictures (default OUT/<tiling>/search_<name>)."),
    max_side: int = typer.Option(1024, "--max-side", min=64, help="Longest side of the heatmap, in pixels."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace pictures of the same query."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Runtime backend (auto picks the bundle's)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for the runtime (default: its own)."),
    json_output: bool = typer.Option(False, "--json", help="Print every tile's score and the top tiles as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """Score every tile of a slide against a text (or a tile, or both), and draw a heatmap over the slide's thumbnail
    and a contact sheet of the top-k tiles."""
    set_debug(debug)
    if text is None and image is None:
        typer.echo("error: give --text, --image or both: the query to score the tiles against", err=True)
        raise typer.Exit(EXIT_USAGE)
    from pue.cli.embed_search import SearchOptions, run_search

    options = SearchOptions(
        out=out, slide=slide, bundle=bundle, text=text, image=image, top_k=top_k, tiling=tiling, name=name,
        slide_file=slide_file, report=report, max_side=max_side, overwrite=overwrite, device=device,
        backend=backend, threads=threads,
    )  # fmt: skip
    raise typer.Exit(run_search(options, json_output))


def _job_options(values: dict[str, Any]) -> Any:
    """The job's options from a command's parameters; --mag and --mpp are exclusive (exit 2)."""
    set_debug(values["debug"])
    if values["mag"] is not None and values["mpp"] is not None:
        typer.echo("error: --mag and --mpp are mutually exclusive: give one target resolution", err=True)
        raise typer.Exit(EXIT_USAGE)
    from pue.cli.embed_run import JobOptions

    return JobOptions(**{field.name: values[field.name] for field in fields(JobOptions) if field.name in values})


def main() -> None:
    app()


if __name__ == "__main__":
    main()
