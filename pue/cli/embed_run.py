"""What `pue-embed` does once its options are parsed: check, load the bundle, build the job, show progress, handle
SIGINT / SIGTERM, print the summary. Imported inside the commands (it loads the runtime)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pue.cli.common import console, print_json
from pue.embed.inputs import SlideInput
from pue.embed.job import JobSettings, SlideJob, SlideProgress, summary
from pue.embed.layout import OutputLayout
from pue.embed.records import RunRecord, SlideRecord
from pue.errors import EXIT_ERROR, EXIT_OK, PueError
from pue.slides.resolution import Resolution

__all__ = ["JobOptions", "build_job", "run_slides", "run_watch", "stop_on_signals"]

DEFAULT_MAGNIFICATION = 20.0


@dataclass(frozen=True)
class JobOptions:
    out: Path
    bundle: Path
    name: str | None = None
    mag: float | None = None
    mpp: float | None = None
    patch_size: int | None = None
    overlap: int = 0
    min_tissue: float = 0.0
    coords_from: Path | None = None
    fmt: str = "h5"
    dtype: str = "float32"
    skip_errors: bool = False
    assume_mpp: float | None = None
    lock_timeout: float = 300.0
    batch_size: int | None = None
    prefetch: int = 2
    device: str = "cpu"
    backend: str = "auto"
    threads: int | None = None
    thumbnails: bool = False
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None


def build_job(options: JobOptions, command: str, stop: threading.Event, progress: SlideProgress) -> SlideJob:
    """Check the options and extras, load the bundle, and make the job with its run record."""
    from pue.extras import require_extras

    if options.mag is not None and options.mpp is not None:
        raise PueError("--mag and --mpp are mutually exclusive", hint="give one target resolution")
    needed = ("openslide", "h5py") + (("pyarrow",) if options.fmt == "parquet" else ())
    ray = str(options.engine) == "ray"
    if not ray and (options.ray_address is not None or options.ray_actors is not None):
        raise PueError("--ray-address and --ray-actors need --engine ray")
    if ray and options.thumbnails:
        raise PueError(
            "--thumbnails is not drawn by the Ray engine (its tiling tasks keep the thumbnails on the workers)",
            hint="embed with --engine ray, then rerun the same command with the local engine and --thumbnails: it "
            "draws the pictures of finished slides without embedding them again",
        )
    require_extras(["slides", "ray"] if ray else ["slides"], command, only={"slides": needed})
    if options.coords_from is not None and not options.coords_from.is_dir():
        raise PueError(
            f"--coords-from {options.coords_from} is not a folder", hint="pass TRIDENT's or CLAM's job folder"
        )
    from pue.bundle import manifest_sha256, read_manifest
    from pue.runtime import Embedder

    manifest = read_manifest(options.bundle)
    resolution = Resolution(
        magnification=options.mag if options.mag is not None or options.mpp is not None else DEFAULT_MAGNIFICATION,
        mpp=options.mpp,
    )
    patch_size = options.patch_size or int(manifest.tile_size)
    if not 0 <= options.overlap < patch_size:
        raise PueError(f"--overlap must be below the patch size {patch_size}, got {options.overlap}")
    embedder = None
    if not ray:  # with Ray the sessions live in the actors
        embedder = Embedder.load(
            options.bundle, backend=options.backend, device=options.device, batch_size=options.batch_size,
            threads=options.threads,
        )  # fmt: skip
    name = options.name or Path(os.path.abspath(options.bundle)).name
    layout = OutputLayout(options.out, resolution, patch_size, options.overlap, name, str(options.fmt))
    settings = JobSettings(
        resolution=resolution,
        patch_size=patch_size,
        overlap=options.overlap,
        min_tissue=options.min_tissue,
        coords_from=options.coords_from,
        fmt=str(options.fmt),  # plain strings (not the CLI's enums): they go into HDF5 attributes
        dtype=str(options.dtype),
        assume_mpp=options.assume_mpp,
        skip_errors=options.skip_errors,
        lock_timeout=options.lock_timeout,
        batch_size=embedder.batch_size if embedder is not None else options.batch_size or manifest.default_batch_size,
        prefetch=options.prefetch,
        thumbnails=options.thumbnails,
    )
    arguments = {key: str(value) if isinstance(value, (Path, str)) else value for key, value in vars(options).items()}
    record = RunRecord(layout.runs_dir, {"command": command, **arguments}, manifest_sha256(options.bundle))
    if embedder is None:
        from pue.embed.ray_engine import RayOptions, RaySlideJob

        ray_options = RayOptions(
            bundle=options.bundle, address=options.ray_address, actors=options.ray_actors, threads=options.threads,
            backend=options.backend, device=options.device,
        )  # fmt: skip
        return RaySlideJob(ray_options, manifest, layout, settings, record, progress=progress, should_stop=stop.is_set)
    return SlideJob(embedder, layout, settings, record, progress=progress, should_stop=stop.is_set)


def run_slides(inputs: list[str], options: JobOptions, json_output: bool = False) -> int:
    """`pue-embed slides`: every input slide once; the exit code says whether any failed."""
    from pue.embed.inputs import resolve_inputs

    slides = resolve_inputs(inputs)
    out = console()
    stop = threading.Event()
    with RichProgress(out, total_slides=len(slides)) as progress, stop_on_signals(stop):
        job = build_job(options, "pue-embed slides", stop, progress)
        out.print(f"{len(slides)} slides → {job.layout.features_dir}")
        try:
            job.run(slides)
        finally:
            job.embedder.close()
    job.record.finish("failed" if job.record.counts().get("failed") else "finished")
    return report(job.record, json_output, out)


def run_watch(folder: Path, settle: float, poll: float, options: JobOptions, json_output: bool = False) -> int:
    """`pue-embed watch`: embed each complete new slide of `folder` until SIGINT / SIGTERM (then exit cleanly)."""
    from pue.embed.pipeline import Interrupted
    from pue.embed.watch import FolderWatcher

    if not folder.is_dir():
        raise PueError(f"not a folder: {folder}", hint="pass the folder the scanner writes into")
    out = console()
    stop = threading.Event()
    state = "stopped"
    with RichProgress(out, total_slides=None) as progress, stop_on_signals(stop):
        job = build_job(replace(options, skip_errors=True), "pue-embed watch", stop, progress)
        watcher = FolderWatcher(folder, settle)
        out.print(f"watching {folder} (settle {settle:g} s) → {job.layout.features_dir}; SIGINT or SIGTERM stops")
        try:
            while not stop.is_set():
                for slide in watcher.ready():
                    if stop.is_set():
                        break
                    job.process(slide)
                stop.wait(poll)
        except Interrupted:
            state = "interrupted"  # the slide in progress was abandoned cleanly; a restart redoes it
        finally:
            job.embedder.close()
    job.record.finish(state)
    return report(job.record, json_output, out)


def report(record: RunRecord, json_output: bool, out: Any) -> int:
    result = summary(record)
    if json_output:
        print_json(result)
    else:
        counts = ", ".join(f"{count} {status}" for status, count in sorted(result["counts"].items())) or "no slides"
        speed = "" if result["tiles_per_s"] is None else f"; {result['tiles_per_s']} tiles/s"
        reader = "" if result["reader_tiles_per_s"] is None else f" (reader alone {result['reader_tiles_per_s']})"
        out.print(f"{counts}; {result['tiles']} tiles{speed}{reader}; run record {result['run_record']}")
    failed = result["failed"]
    if failed:
        print(f"error: {len(failed)} slide(s) failed: " + "; ".join(s["slide_id"] for s in failed), file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT / SIGTERM set `stop` (the job abandons the current slide cleanly); a second one stops at once."""

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"signal {signum}: stopping (the current slide is abandoned, finished ones are kept)", file=sys.stderr)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class RichProgress(SlideProgress):
    """Slides and tiles bars with tiles/s and ETA, on stderr."""

    def __init__(self, out: Any, total_slides: int | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=out,
            transient=True,
        )
        self.slides = self.progress.add_task("slides", total=total_slides, rate="")
        self.tiles = self.progress.add_task("tiles", total=0, rate="")

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def slide_started(self, slide: SlideInput, tiles: int) -> None:
        self.progress.reset(self.tiles, total=tiles, description=f"tiles of {slide.slide_id}", rate="")

    def tiles_done(self, count: int) -> None:
        self.progress.advance(self.tiles, count)
        speed = self.progress.tasks[self.tiles].speed
        self.progress.update(self.tiles, rate="" if speed is None else f"{speed:.1f} tiles/s")

    def slide_finished(self, record: SlideRecord) -> None:
        self.progress.advance(self.slides, 1)
        if record.status in ("failed", "locked", "interrupted"):
            detail = f": {record.error}" if record.error else ""
            self.progress.console.print(f"{record.slide_id}: {record.status}{detail}")
