"""The slide job: every tissue tile of every slide → one features file per slide, resumable, shareable.

For each slide, in order: skip it when its output exists and records this run's parameters and the source's size
and modification time (a rescan under the same name is redone); otherwise take its lock (`pue.embed.locks`;
another process holding it means "not mine", the slide is left to it), check again that it is not done, tile it
(`pue.slides`, or the coordinates of `--coords-from`), embed the tiles through the prefetch pipeline, write the file
atomically, release the lock. A slide that cannot be read or tiled fails with its reason: without `skip_errors`
the job stops there (earlier slides are kept), with it the job goes on; the run record says which.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pue import __version__
from pue.embed.inputs import SlideInput
from pue.embed.layout import OutputLayout
from pue.embed.locks import SlideLock
from pue.embed.pipeline import Interrupted, PipelineStats, embed_tiles
from pue.embed.records import RunRecord, SlideRecord
from pue.embed.slide_plan import coords_attributes, slide_tiles
from pue.embed.writers import read_job_attribute, temp_name, write_slide_file
from pue.errors import PueError
from pue.slides.coords_files import find_coords_file
from pue.slides.readers import SlideReader, open_slide
from pue.slides.resolution import Resolution
from pue.slides.thumbnails import render_tiles_overview, write_png_atomically
from pue.slides.tiling import SlideTiles, thumbnail_side
from pue.slides.tissue import TissueFilter

__all__ = ["JobSettings", "SlideJob", "SlideProgress"]

JOB_FORMAT = 1


@dataclass(frozen=True)
class JobSettings:
    """Everything that decides a slide's output (and so whether an existing output is this run's)."""

    resolution: Resolution
    patch_size: int
    overlap: int = 0
    min_tissue: float = 0.0
    coords_from: Path | None = None
    fmt: str = "h5"
    dtype: str = "float32"
    assume_mpp: float | None = None
    tissue_filter: TissueFilter = field(default_factory=TissueFilter)
    # how the job runs (not part of the output's identity)
    skip_errors: bool = False
    lock_timeout: float = 300.0
    batch_size: int = 8
    prefetch: int = 2
    reader: str = "auto"
    thumbnails: bool = False  # a PNG per slide: thumbnail, tissue mask, embedded tiles


class SlideProgress:
    """Callbacks for a progress display; the library's default shows nothing."""

    def slide_started(self, slide: SlideInput, tiles: int) -> None: ...

    def tiles_done(self, count: int) -> None: ...

    def slide_finished(self, record: SlideRecord) -> None: ...


class SlideJob:
    def __init__(
        self,
        embedder: Any,
        layout: OutputLayout,
        settings: JobSettings,
        record: RunRecord,
        progress: SlideProgress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.embedder = embedder
        self.layout = layout
        self.settings = settings
        self.record = record
        self.progress = progress or SlideProgress()
        self.should_stop = should_stop or (lambda: False)
        manifest = embedder.manifest
        self.features_attrs = {
            "encoder": manifest.source_checkpoint.name,
            "name": layout.name,
            "precision": manifest.precision,
            "bundle_sha256": record.bundle_sha256,
            "pue_version": __version__,
            "embedding_dim": int(manifest.embedding_dim),
            "tile_size": int(manifest.tile_size),
        }
        layout.make()

    # --- the job --------------------------------------------------------------------------------------------
    def run(self, slides: list[SlideInput]) -> RunRecord:
        """Every slide once; raises the first failure unless `skip_errors` (the record is saved either way)."""
        for slide in slides:
            if self.should_stop():
                self.record.finish("interrupted")
                raise Interrupted("interrupted between slides; finished slides are kept")
            self.process(slide)
        return self.record

    def process(self, slide: SlideInput) -> SlideRecord:
        """One slide: skip, leave to another process, embed, or fail (recorded; raised unless skip_errors)."""
        started = time.perf_counter()
        entry = SlideRecord(slide_id=slide.slide_id, path=str(slide.path), status="skipped")
        try:
            claim = self.claim(slide, entry)
            if claim is None:
                if entry.status == "skipped":
                    self._missing_thumbnail(slide)
                return self._finish(entry)
            lock, job = claim
            with lock:
                stats, tiles = self._embed(slide, self.layout.output(slide.slide_id), job)
            entry.status = "done"
            entry.tiles, entry.grid_tiles = stats.tiles, tiles.grid_tiles
            entry.reader_seconds = round(stats.reader_seconds, 4)
        except Interrupted:
            entry.status = "interrupted"
            self._finish(entry, started)
            self.record.finish("interrupted")
            raise
        except (PueError, OSError) as exc:
            return self.fail(slide, entry, exc, started)
        return self._finish(entry, started)

    def claim(self, slide: SlideInput, entry: SlideRecord) -> tuple[SlideLock, dict[str, Any]] | None:
        """This process's lock on `slide` and the job attribute its output will carry, or None when the slide is
        done (`entry.status` stays "skipped") or another process holds it ("locked")."""
        final = self.layout.output(slide.slide_id)
        job = self.job_attribute(slide)
        if self._done(final, job):
            return None
        lock = SlideLock(self.layout.lock(slide.slide_id), self.settings.lock_timeout)
        if not lock.acquire():
            entry.status = "locked"
            return None
        if lock.taken_over is not None:
            owner = lock.taken_over
            entry.took_over_from = f"{owner.host}:{owner.pid}"
            temp_name(final, owner.host, owner.pid).unlink(missing_ok=True)
        if self._done(final, job):  # finished by another process meanwhile
            lock.release()
            return None
        return lock, job

    def fail(self, slide: SlideInput, entry: SlideRecord, exc: BaseException, started: float) -> SlideRecord:
        """Record `slide` as failed; raise (the job stops there) unless skip_errors."""
        entry.status = "failed"
        entry.error = str(exc)
        self._finish(entry, started)
        if not self.settings.skip_errors:
            self.record.finish("failed")
            raise PueError(
                f"slide {slide.slide_id} ({slide.path}) failed: {exc}",
                hint="earlier slides are kept and a rerun skips them; --skip-errors records a failed slide and goes on",
            ) from exc
        return entry

    def job_attribute(self, slide: SlideInput) -> dict[str, Any]:
        """What an output must record to count as this run's result for `slide`."""
        settings = self.settings
        try:
            stat = slide.path.stat()
        except OSError as exc:
            raise PueError(f"slide not found: {slide.path}") from exc
        coords_file = None
        if settings.coords_from is not None:
            found = find_coords_file(settings.coords_from, slide.slide_id)
            coords_stat = found.stat()
            coords_file = {"name": found.name, "size": coords_stat.st_size, "mtime_ns": coords_stat.st_mtime_ns}
        return {
            "job_format": JOB_FORMAT,
            "slide_id": slide.slide_id,
            "source": {"name": slide.path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "bundle_sha256": self.record.bundle_sha256,
            "target": settings.resolution.text(),
            "patch_size": settings.patch_size,
            "overlap": settings.overlap,
            "min_tissue": settings.min_tissue,
            "tissue_filter": asdict(settings.tissue_filter),
            "coords_from": coords_file,
            "dtype": settings.dtype,
            "mpp": slide.mpp,
            "assume_mpp": None,  # set when written: the --assume-mpp value, if the slide needed it
        }

    def _done(self, final: Path, job: dict[str, Any]) -> bool:
        """Whether `final` is this run's result: the same job, and --assume-mpp the same if the slide used it."""
        existing = read_job_attribute(final, self.settings.fmt)
        if existing is None:
            return False
        assumed = existing.get("assume_mpp")
        return {**existing, "assume_mpp": None} == job and assumed in (None, self.settings.assume_mpp)

    # --- one slide ------------------------------------------------------------------------------------------
    def _embed(self, slide: SlideInput, final: Path, job: dict[str, Any]) -> tuple[PipelineStats, SlideTiles]:
        settings = self.settings
        reader = open_slide(slide.path, settings.reader)
        try:
            tiles = slide_tiles(reader, slide, settings)
            geometry = tiles.geometry
            self.progress.slide_started(slide, len(tiles))
            features, stats = embed_tiles(
                reader,
                tiles.coords,
                geometry.patch_size_level0,
                geometry.patch_size,
                self.embedder,
                settings.batch_size,
                prefetch=settings.prefetch,
                should_stop=self.should_stop,
                on_batch=self.progress.tiles_done,
            )
            if settings.thumbnails:  # before the features: a finished slide of a --thumbnails run has its picture
                self._write_thumbnail(reader, slide, tiles)
            self.write(slide, final, job, tiles, coords_attributes(slide, reader, tiles, settings), features)
        finally:
            reader.close()
        return stats, tiles

    def _write_thumbnail(self, reader: SlideReader, slide: SlideInput, tiles: SlideTiles) -> None:
        thumbnail, scale = tiles.thumbnail, tiles.mask_scale
        if thumbnail is None:  # --coords-from: no tissue mask was computed
            stride = tiles.geometry.stride_level0
            thumbnail, scale = reader.thumbnail(thumbnail_side(reader.width, reader.height, stride))
        picture = render_tiles_overview(thumbnail, scale, tiles.coords, tiles.geometry.patch_size_level0, tiles.mask)
        write_png_atomically(picture, self.layout.thumbnail(slide.slide_id))

    def _missing_thumbnail(self, slide: SlideInput) -> None:
        """A slide finished by a run without --thumbnails gets its picture now (tiling again is cheap and gives the
        same tiles for the same parameters; nothing is embedded again)."""
        if not self.settings.thumbnails or self.layout.thumbnail(slide.slide_id).exists():
            return
        reader = open_slide(slide.path, self.settings.reader)
        try:
            self._write_thumbnail(reader, slide, slide_tiles(reader, slide, self.settings))
        finally:
            reader.close()

    def write(
        self,
        slide: SlideInput,
        final: Path,
        job: dict[str, Any],
        tiles: SlideTiles,
        coords_attrs: dict[str, Any],
        features: np.ndarray,
    ) -> None:
        """The slide's file, atomically: its tiles' coordinates and features (float32 (N, D), stored as --dtype)."""
        settings = self.settings
        stored = features.astype(np.float16) if settings.dtype == "float16" else features
        assumed = settings.assume_mpp if tiles.geometry.mpp_source == "assumed" else None
        write_slide_file(
            final,
            settings.fmt,
            slide.slide_id,
            tiles.coords,
            stored,
            coords_attrs,
            {**self.features_attrs, "dtype": settings.dtype},
            {**job, "assume_mpp": assumed},
        )

    def _finish(self, entry: SlideRecord, started: float | None = None) -> SlideRecord:
        if started is not None:
            entry.seconds = round(time.perf_counter() - started, 4)
        self.record.add(entry)
        self.progress.slide_finished(entry)
        return entry


def summary(record: RunRecord) -> dict[str, Any]:
    """The numbers a user compares: slides per status, tiles, tiles/s of the job and of the reader alone."""
    done = [slide for slide in record.slides if slide.status == "done"]
    tiles = sum(slide.tiles for slide in done)
    seconds = sum(slide.seconds for slide in done)
    reader_seconds = sum(slide.reader_seconds for slide in done)
    wall = None if record.finished is None else round(record.finished - record.started, 3)
    return {
        "run_record": str(record.path),
        "state": record.state,
        "counts": record.counts(),
        "tiles": tiles,
        "seconds": round(seconds, 3),
        "tiles_per_s": round(tiles / seconds, 3) if seconds > 0 else None,
        "reader_tiles_per_s": round(tiles / reader_seconds, 3) if reader_seconds > 0 else None,
        # the run from its record's creation (the bundle loaded; Ray not yet started) to its end: engines compare by it
        "wall_seconds": wall,
        "wall_tiles_per_s": round(tiles / wall, 3) if wall else None,
        "failed": [{"slide_id": s.slide_id, "error": s.error} for s in record.slides if s.status == "failed"],
        "pid": os.getpid(),
    }
