"""The slide job on a Ray cluster (`pue-embed slides --engine ray`, the `ray` extra).

The driver does what decides correctness, the cluster does the work:

1. **Start-up check.** One task per alive node (pinned to it) looks at every slide (size and modification time as
   the driver sees them), the bundle (its manifest's sha256) and the output folder (a probe file the driver wrote);
   a node that does not see them all stops the job with one line naming the node and the paths.
2. **Claim**, in waves of `wave` slides: as the local engine does (`SlideJob.claim`): skip a finished slide, leave a
   slide another process holds, lock the rest (the locks' heartbeats run on the driver).
3. **Tile** each claimed slide in a Ray task (`ray_tasks.plan_slide`).
4. **Embed** through a Ray dataset whose rows are the tile batches, formed per slide exactly as the local engine forms
   them (so the same batch composition gives the same vectors bit for bit on CPU): `map_batches(read_pixels)` as
   tasks (reading and preprocessing), then `map_batches(EmbedPixels, compute=ActorPoolStrategy(size=N))`: one
   session per actor, `num_cpus` per actor = its intra-op threads (N = (cluster CPUs − 1) ÷ threads, leaving a CPU
   for reading), or `num_gpus=1` per actor on GPUs.
5. **Commit** per slide on the driver as its last batch arrives: the same writer, the same atomic rename, the same
   job attribute and resume rule as the local engine. Ray's own `write_parquet` is not used: it appends uuid-named
   block files, so a rerun would duplicate rows and nothing would mark a slide complete.

`kill -9` of the driver ends its Ray job (actors and tasks share its fate), leaves at most temporary files and
locks of a dead pid, and a rerun takes those over, as with the local engine.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pue.embed.inputs import SlideInput
from pue.embed.job import SlideJob
from pue.embed.locks import SlideLock
from pue.embed.pipeline import Interrupted
from pue.embed.records import RunRecord, SlideRecord
from pue.errors import MissingDependencyError, PueError
from pue.slides.tiling import SlideTiles

__all__ = ["BundleOnDriver", "RayOptions", "RaySlideJob", "check_paths_visible"]

DEFAULT_WAVE = 32  # slides claimed (locked) at a time


@dataclass(frozen=True)
class RayOptions:
    bundle: Path
    address: str | None = None  # None: a local Ray started for the job (or the session this process already has)
    actors: int | None = None  # None: from the cluster's CPUs (or GPUs)
    threads: int | None = None  # intra-op threads per actor (= its num_cpus); None: 1
    backend: str = "auto"
    device: str = "cpu"
    wave: int = DEFAULT_WAVE


class BundleOnDriver:
    """The driver's view of the bundle: its manifest (for the files' attributes). The driver embeds nothing."""

    def __init__(self, manifest: Any) -> None:
        self.manifest = manifest
        self.dimension = int(manifest.embedding_dim)

    def close(self) -> None:
        """Nothing to release: the sessions live in the Ray actors."""


@dataclass
class _Claimed:
    slide: SlideInput
    entry: SlideRecord
    lock: SlideLock
    job: dict[str, Any]
    started: float
    tiles: SlideTiles | None = None
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None
    remaining: int = 0
    read_seconds: float = 0.0


class RaySlideJob(SlideJob):
    """`SlideJob` whose slides are tiled and embedded on Ray (module docstring); claims and commits stay here."""

    def __init__(self, options: RayOptions, manifest: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(BundleOnDriver(manifest), *args, **kwargs)
        self.options = options

    def run(self, slides: list[SlideInput]) -> RunRecord:
        ray = _import_ray()
        # Workers do not share the driver's working directory: every path they get is absolute.
        slides = [replace(slide, path=Path(os.path.abspath(slide.path))) for slide in slides]
        if self.settings.coords_from is not None:
            self.settings = replace(self.settings, coords_from=Path(os.path.abspath(self.settings.coords_from)))
        self.options = replace(self.options, bundle=Path(os.path.abspath(self.options.bundle)))
        started_here = connect(ray, self.options.address)
        try:
            check_paths_visible(ray, slides, self.options.bundle, Path(os.path.abspath(self.layout.features_dir)))
            actors, threads, gpus = pool_size(ray, self.options)
            for first in range(0, len(slides), max(1, self.options.wave)):
                self._run_wave(ray, slides[first : first + self.options.wave], actors, threads, gpus)
        finally:
            if started_here:
                ray.shutdown()
        return self.record

    # --- one wave ---------------------------------------------------------------------------------------
    def _run_wave(self, ray: Any, slides: list[SlideInput], actors: int, threads: int, gpus: int) -> None:
        claimed: list[_Claimed] = []
        try:
            for slide in slides:
                if self.should_stop():
                    raise Interrupted("interrupted between slides; finished slides are kept")
                self._claim(slide, claimed)
            self._plan(ray, claimed)
            pending = [item for item in claimed if item.remaining > 0]
            if pending:
                self._embed_on_ray(ray, pending, actors, threads, gpus)
        except Interrupted:
            for item in claimed:
                if item.entry.status == "skipped":  # claimed, not finished
                    item.entry.status = "interrupted"
                    self._finish(item.entry, item.started)
            self.record.finish("interrupted")
            raise
        finally:
            for item in claimed:
                item.lock.release()

    def _claim(self, slide: SlideInput, claimed: list[_Claimed]) -> None:
        started = time.perf_counter()
        entry = SlideRecord(slide_id=slide.slide_id, path=str(slide.path), status="skipped")
        try:
            claim = self.claim(slide, entry)
        except (PueError, OSError) as exc:
            self.fail(slide, entry, exc, started)
            return
        if claim is None:
            self._finish(entry)
        else:
            claimed.append(_Claimed(slide, entry, claim[0], claim[1], started))

    def _plan(self, ray: Any, claimed: list[_Claimed]) -> None:
        """Tile every claimed slide in a task; a slide without tiles is written at once, a bad one fails."""
        from pue.embed.ray_tasks import plan_slide

        task = ray.remote(num_cpus=1)(plan_slide)
        plans = ray.get([task.remote(item.slide, self.settings) for item in claimed])
        for item, plan in zip(claimed, plans, strict=True):
            if "error" in plan:
                self._fail(item, plan["error"])
                continue
            item.tiles, item.coords_attrs = plan["tiles"], plan["coords_attrs"]
            item.remaining = len(item.tiles)
            item.features = np.empty((item.remaining, self.embedder.dimension), np.float32)
            if item.remaining == 0:
                self._commit(item)

    def _embed_on_ray(self, ray: Any, pending: list[_Claimed], actors: int, threads: int, gpus: int) -> None:
        from pue.embed.ray_tasks import EmbedPixels, read_pixels

        rows = []
        for index, item in enumerate(pending):
            assert item.tiles is not None
            geometry = item.tiles.geometry
            for start in range(0, len(item.tiles), self.settings.batch_size):
                batch = item.tiles.coords[start : start + self.settings.batch_size]
                rows.append({"slide": index, "start": start, "path": str(item.slide.path),
                             "extent": geometry.patch_size_level0, "size": geometry.patch_size,
                             "coords": np.ascontiguousarray(batch, np.int64).tobytes()})  # fmt: skip
        self.progress.slide_started(
            SlideInput(f"{len(pending)} slides on Ray", Path()), sum(len(p.tiles) for p in pending)
        )  # type: ignore[arg-type]
        ray.data.DataContext.get_current().enable_progress_bars = False  # pue's own display shows tiles and tiles/s
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        dataset = dataset.map_batches(
            read_pixels, batch_size=1, batch_format="numpy", num_cpus=1,
            fn_kwargs={"bundle": str(self.options.bundle), "reader": self.settings.reader},
        )  # fmt: skip
        dataset = dataset.map_batches(
            EmbedPixels,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "bundle": str(self.options.bundle),
                "backend": self.options.backend,
                "device": self.options.device,
                "threads": threads,
            },  # fmt: skip
            num_cpus=threads if gpus == 0 else 1,
            num_gpus=gpus,
        )
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for row in range(len(batch["slide"])):
                    if self.should_stop():
                        raise Interrupted("interrupted in the middle of a wave; its unfinished slides were discarded")
                    self._receive(pending[int(batch["slide"][row])], batch, row)
            for item in pending:  # every batch came back exactly once, or the slide failed
                if item.remaining and item.entry.status != "failed":
                    self._fail(item, f"internal: {item.remaining} tiles did not come back from Ray")
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise PueError(f"the Ray job failed: {message}", hint="rerun with --debug for Ray's traceback") from exc

    def _receive(self, item: _Claimed, batch: dict[str, np.ndarray], row: int) -> None:
        if item.entry.status == "failed":
            return
        count, start = int(batch["count"][row]), int(batch["start"][row])
        if batch["error"][row]:
            self._fail(item, str(batch["error"][row]))
            return
        assert item.features is not None
        item.features[start : start + count] = np.frombuffer(batch["features"][row], np.float32).reshape(count, -1)
        item.read_seconds += float(batch["read_seconds"][row])
        item.remaining -= count
        self.progress.tiles_done(count)
        if item.remaining == 0:
            self._commit(item)

    def _commit(self, item: _Claimed) -> None:
        assert item.tiles is not None and item.features is not None
        self.write(item.slide, self.layout.output(item.slide.slide_id), item.job, item.tiles, item.coords_attrs,
                   item.features)  # fmt: skip
        item.lock.release()
        entry = item.entry
        entry.status, entry.tiles, entry.grid_tiles = "done", len(item.tiles), item.tiles.grid_tiles
        entry.reader_seconds = round(item.read_seconds, 4)
        self._finish(entry, item.started)

    def _fail(self, item: _Claimed, message: str) -> None:
        item.lock.release()
        self.fail(item.slide, item.entry, PueError(message), item.started)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
        import ray.util.scheduling_strategies
    except ImportError as exc:
        raise MissingDependencyError("ray", "ray", "pue-embed slides --engine ray") from exc
    return ray


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local one; True when this call started the session."""
    if ray.is_initialized():
        return False  # this process already has a session (a notebook's, the tests' ray.init(num_cpus=2))
    try:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # ray.init raises plain Exception for a node that did not start
        if address is not None:
            raise PueError(
                f"cannot connect to Ray at {address}: {exc}", hint="check --ray-address (ray status)"
            ) from exc
        raise PueError(
            f"a local Ray did not start: {exc}",
            hint="its raylet waits only 15 s for its agents to start (ray-project/ray#65983), which a busy machine can "
            "miss: start Ray first (ray start --head) and pass --ray-address auto, or use --engine local",
        ) from exc
    return True


def pool_size(ray: Any, options: RayOptions) -> tuple[int, int, int]:
    """(actors, intra-op threads per actor, GPUs per actor) for the cluster's resources."""
    resources = ray.cluster_resources()
    if options.device.startswith("cuda"):
        if options.device != "cuda":
            raise PueError(f"--device {options.device} with --engine ray", hint="Ray gives each actor one GPU: pass "
                           "--device cuda")  # fmt: skip
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise PueError("--device cuda with --engine ray, but the Ray cluster has no GPU", hint="--device cpu")
        return options.actors or gpus, options.threads or 1, 1
    cpus = int(resources.get("CPU", 1))
    threads = options.threads or 1
    actors = options.actors or max(1, (cpus - 1) // threads)
    if actors * threads > max(1, cpus - 1) and options.actors is None:
        actors = 1
    return actors, threads, 0


def check_paths_visible(ray: Any, slides: list[SlideInput], bundle: Path, output: Path) -> None:
    """One task on each alive node: the slides, the bundle and the output folder as the driver sees them, or stop."""
    from pue.bundle import manifest_sha256
    from pue.embed.ray_tasks import look_at_paths

    files = {}
    for slide in slides:
        stat = slide.path.stat()
        files[str(slide.path)] = (stat.st_size, stat.st_mtime_ns)
    token = uuid.uuid4().hex
    probe = output / f".pue-ray-probe-{token}"
    probe.write_text(token)
    expected = {"files": files, "bundle": (str(bundle), manifest_sha256(bundle)), "probe": (str(probe), token)}
    try:
        task = ray.remote(num_cpus=0)(look_at_paths)
        pinned = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        refs = [
            task.options(scheduling_strategy=pinned(node["NodeID"], soft=False)).remote(
                expected
            )
            for node in nodes
        ]
        seen = ray.get(refs)
    finally:
        probe.unlink(missing_ok=True)
    for node, view in zip(nodes, seen, strict=True):
        if view["problems"]:
            shown = "; ".join(view["problems"][:3]) + (
                f"; and {len(view['problems']) - 3} more" if len(view["problems"]) > 3 else ""
            )
            raise PueError(
                f"Ray node {node.get('NodeManagerAddress', view['host'])} does not see the job's paths as the "
                f"driver does: {shown}",
                hint="every node must see the slides, the bundle and the output folder at the same paths (a shared "
                "filesystem mounted alike); or run --engine local",
            )
