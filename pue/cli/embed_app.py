"""`pue-embed`: embed whole slides (`slides`) or a scanner's output folder (`watch`). Thin: parse, check, hand over
to `pue.embed`. Nothing heavy is imported at module level, so `pue-embed --help` loads no torch and no onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer

from pue.choices import FeatureDtype, FeatureFormat
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
    """Embed whole slides (`slides`) or watch a scanner's output folder (`watch`)."""


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
    output_format: FeatureFormat = typer.Option(FeatureFormat.H5, "--format", help="h5 (TRIDENT) or parquet."),
    dtype: FeatureDtype = typer.Option(FeatureDtype.FLOAT32, "--dtype", help="Stored features dtype (HDF5)."),
    skip_errors: bool = typer.Option(False, "--skip-errors", help="Record a failed slide and go on."),
    assume_mpp: float = typer.Option(None, "--assume-mpp", help="µm/px of slides that record no resolution."),
    lock_timeout: float = typer.Option(300.0, "--lock-timeout", min=1.0, help="Seconds before a silent lock is stale."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Tiles per batch (default: the bundle's)."),
    prefetch: int = typer.Option(2, "--prefetch", min=1, help="Batches the reader thread may read ahead."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Runtime backend (auto picks the bundle's)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for the runtime (default: its own)."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
) -> None:
    """Embed every tissue tile of INPUTS into OUT/<mag>x_<ps>px_<ov>px_overlap/features_<name>/<slide_id>.h5."""
    set_debug(debug)
    if mag is not None and mpp is not None:
        typer.echo("error: --mag and --mpp are mutually exclusive: give one target resolution", err=True)
        raise typer.Exit(EXIT_USAGE)
    from pue.cli.embed_run import run_slides

    code = run_slides(
        inputs=inputs,
        out=out,
        bundle=bundle,
        name=name,
        mag=mag,
        mpp=mpp,
        patch_size=patch_size,
        overlap=overlap,
        min_tissue=min_tissue,
        coords_from=coords_from,
        fmt=output_format.value,
        dtype=dtype.value,
        skip_errors=skip_errors,
        assume_mpp=assume_mpp,
        lock_timeout=lock_timeout,
        batch_size=batch_size,
        prefetch=prefetch,
        device=device,
        backend=backend,
        threads=threads,
        json_output=json_output,
    )
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
