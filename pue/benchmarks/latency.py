"""`pue-bench latency`: each bundle on its backend and the PyTorch reference (fp32, and bf16 or fp16 where the
hardware has it) on the same shipped held-out patches, each in a subprocess of its own, so that peak memory is
its own and torch's threads never compete with onnxruntime's.

Every (model, batch size) becomes one row: p50/p90/p99 latency per batch, throughput, peak memory, speed-ups
over the fp32 reference and over the fastest reference, stage times, and the distance to the limit: the FLOPs
of one patch against this machine's matmul peak of the row's precision (measured in the same run), minutes per
slide, and the best case on common GPUs from their datasheets.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pue.benchmarks.flops import FlopCount, bundle_crops, graph_flops, image_sequence_length, patch_flops
from pue.benchmarks.latency_rows import (
    WorkerOutcome,
    add_limits,
    add_speedups,
    best_of_rounds,
    rows_from_outcome,
)
from pue.benchmarks.latency_worker import BATCH_PREFIX, LOADED_PREFIX, PRECISION_OF_DTYPE, WorkerSpec
from pue.benchmarks.peaks import gpu_best_case, measure_peaks
from pue.bundle import Manifest, read_manifest
from pue.errors import PueError
from pue.runtime.cpu import usable_core_count

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 8)
DEFAULT_PATCHES_PER_SLIDE = 10_000
DTYPE_OF_PRECISION = {precision: dtype for dtype, precision in PRECISION_OF_DTYPE.items()}
STDERR_TAIL_LINES = 12
BUSY_LOAD_PER_CORE = 0.5  # a 1-minute load average above this per usable core means something else is running


# ------------------------------------------------------------------------------------------------ public API


def run_latency(
    bundles: Sequence[str | Path],
    reference: str | Path | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup: int = 2,
    iters: int = 10,
    device: str = "cpu",
    threads: int | None = None,
    reference_precisions: Sequence[str] | None = None,
    images: Sequence[str | Path] | None = None,
    patches_per_slide: int = DEFAULT_PATCHES_PER_SLIDE,
    peaks: bool = True,
    timeout_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    rounds: int = 1,
    images_per_row: int = 1,
    backends: Sequence[str] = ("auto",),
) -> dict[str, Any]:
    """Measure every bundle (and the reference, if given) and return the report (see `pue.benchmarks.report`).

    With `rounds` > 1 every worker runs once per round, in reverse order on every other round, and each row keeps
    its fastest round (`round_items_per_s` lists them all): on a shared machine a neighbour's burst then spoils
    one round of one row, not the ratio between rows.

    A worker that fails leaves rows with an `error` field for the batch sizes it did not finish; the others are
    still measured. `reference_precisions` defaults to fp32 plus bf16 on CPUs with native bf16, fp32 plus fp16 on
    CUDA. `images` defaults to the shipped held-out patches (`pue.data.patch_set("heldout")`).

    `images_per_row` > 1 measures the multi-image row type: each of a batch's rows is one query of that many
    images (a region's tiles), `items_per_s` counts rows, and FLOP-based columns are left empty (the FLOP count is
    per single-image row).

    `backends` lists the backends each bundle runs on ("auto": the one `Embedder.load` picks); a bundle gets one row
    per backend that runs it (named "BUNDLE (BACKEND)" where it is not the automatic choice), and a backend that
    cannot run a bundle is said in `notes` with the registry's reason.
    """
    say = progress or (lambda message: log.info(message))
    sizes = _check_settings(bundles, batch_sizes, warmup, iters, patches_per_slide)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PueError(f"rounds must be a positive integer, got {rounds!r}")
    targets = _bundle_targets(bundles)
    manifests = [manifest for _, _, manifest in targets]
    checkpoint = check_reference(reference, targets) if reference is not None else None
    precisions = reference_precisions_for(device, reference_precisions) if checkpoint is not None else []
    image_paths = [str(path) for path in (images if images is not None else _heldout())]
    if not image_paths:
        raise PueError("no images to benchmark with", "pass image paths, or reinstall pue (held-out patches)")
    notes: list[str] = []
    load_before = _load_average()
    if load_before is not None and load_before >= BUSY_LOAD_PER_CORE * usable_core_count():
        notes.append(
            f"the machine was busy before the run (1-minute load average {load_before:.1f} on "
            f"{usable_core_count()} cores): other processes compete for the cores and timings are unreliable"
        )

    machine_peaks = None
    if peaks:
        say("measuring this machine's matmul peaks (fp32, bf16, int8)")
        try:
            machine_peaks = measure_peaks(threads=threads, device=device)
        except PueError as exc:
            notes.append(f"peaks not measured: {exc}")

    common = {
        "batch_sizes": sizes,
        "warmup": warmup,
        "iters": iters,
        "device": device,
        "threads": threads,
        "images": image_paths,
        "images_per_row": images_per_row,
    }
    jobs: list[tuple[str, WorkerSpec, str, str, str]] = []  # name, spec, precision, backend, what to say
    if checkpoint is not None:
        first = manifests[0]
        for precision in precisions:
            spec = WorkerSpec(
                kind="reference",
                path=str(checkpoint.path),
                dtype=DTYPE_OF_PRECISION[precision],
                tile_size=first.tile_size,
                recipe=first.recipe,
                embedding_dim=first.embedding_dim,
                **common,
            )
            name = f"pytorch {precision}"
            jobs.append((name, spec, precision, "pytorch", f"{name}: {checkpoint.path} on {device}"))
    for name, path, manifest in targets:
        for backend, row_name in bundle_backends(name, path, manifest, backends, device, notes):
            spec = WorkerSpec(kind="bundle", path=str(path), backend=backend, **common)
            message = f"{row_name}: {manifest.precision} bundle on {backend}, {device}"
            jobs.append((row_name, spec, manifest.precision, backend, message))
    per_round: list[list[dict[str, Any]]] = []
    for index in range(rounds):
        order = jobs if index % 2 == 0 else list(reversed(jobs))
        measured = []
        for name, spec, precision, backend, message in order:
            say(message + (f" (round {index + 1} of {rounds})" if rounds > 1 else ""))
            measured.extend(rows_from_outcome(name, spec, run_worker_process(spec, timeout_s), precision, backend))
        per_round.append(measured)
    rows = best_of_rounds(per_round, [name for name, *_ in jobs])

    models = _count_flops(targets, checkpoint, patches_per_slide, notes)
    for row in rows:
        row["images_per_row"] = images_per_row
        row["flops_per_item"] = _flops_of(row["path"], models) if images_per_row == 1 else None
    add_speedups(rows)
    add_limits(rows, machine_peaks, patches_per_slide)

    from pue.benchmarks.environment import collect_environment

    return {
        "schema_version": _schema_version(),
        "kind": "latency",
        "environment": collect_environment(),
        "settings": {
            **{k: v for k, v in common.items() if k != "images"},
            "rounds": rounds,
            "images": len(image_paths),
            "image_source": "pue.data heldout" if images is None else "user",
            "patches_per_slide": patches_per_slide,
            "reference": None if checkpoint is None else str(checkpoint.path),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
        "peaks": machine_peaks,
        "models": models,
        "results": rows,
        "notes": notes,
    }


def check_reference(reference: str | Path, targets: list[tuple[str, Path, Manifest]]) -> Any:
    """The reference checkpoint, if it is the source of every bundle (same weights sha256), else a PueError."""
    from pue.export.checkpoint import checkpoint_sha256, inspect_checkpoint

    info = inspect_checkpoint(reference)
    digest = checkpoint_sha256(info)
    for _name, path, manifest in targets:
        recorded = manifest.source_checkpoint.sha256
        if recorded != digest:
            raise PueError(
                f"--reference {info.path} is not the source checkpoint of bundle {path}: its weights hash to "
                f"{digest[:16]}…, the bundle was built from '{manifest.source_checkpoint.name}' ({recorded[:16]}…)",
                "pass the checkpoint the bundle was exported from, or leave --reference out",
            )
    sizes = {(m.tile_size, json.dumps(m.recipe, sort_keys=True), m.embedding_dim) for _, _, m in targets}
    if len(sizes) > 1:
        raise PueError(
            "the bundles were built with different tile sizes, recipes or output dimensions, so one reference cannot "
            "match them all",
            "benchmark them in separate runs",
        )
    return info


def bundle_backends(
    name: str, path: Path, manifest: Manifest, backends: Sequence[str], device: str, notes: list[str]
) -> list[tuple[str, str]]:
    """(backend, row name) for each requested backend that runs the bundle on `device`; "auto" resolves to the
    registry's first choice, whose row keeps the bundle's name. Refusals go to `notes` with their reason."""
    from pue.runtime.backends.registry import AUTO, capable

    able = [spec.name for spec in capable(path, manifest, device)]
    automatic = able[0] if able else None
    chosen: list[tuple[str, str]] = []
    for requested in dict.fromkeys(backends):
        backend = automatic if requested == AUTO else requested
        if backend is None or backend not in able:
            notes.append(f"{name}: no {requested} row: {_refusal(path, manifest, requested, device)}")
            continue
        if backend not in (b for b, _ in chosen):
            chosen.append((backend, name if backend == automatic else f"{name} ({backend})"))
    return chosen


def _refusal(path: Path, manifest: Manifest, backend: str, device: str) -> str:
    """Why the registry will not run the bundle on `backend` (its refusal's message)."""
    from pue.runtime.backends.registry import choose

    try:
        choose(path, manifest, backend, device)
    except PueError as exc:
        return exc.message
    return f"backend '{backend}' does not run it"


def reference_precisions_for(device: str, requested: Sequence[str] | None = None) -> list[str]:
    """fp32, plus bf16 on a CPU with native bf16 (AVX512-BF16, AMX, Arm BF16) or fp16 on CUDA; or as asked."""
    if requested:
        unknown = [p for p in requested if p not in DTYPE_OF_PRECISION]
        if unknown:
            raise PueError(f"unknown reference precision(s) {unknown}", f"choose from {sorted(DTYPE_OF_PRECISION)}")
        return list(dict.fromkeys(requested))
    if device.startswith("cuda"):
        return ["fp32", "fp16"]
    from pue.benchmarks.environment import cpu_supports_bf16

    return ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]


# ------------------------------------------------------------------------------------------------ workers


def run_worker_process(spec: WorkerSpec, timeout_s: float | None = None) -> WorkerOutcome:
    """Run one worker subprocess and collect its result lines, even when it fails part-way."""
    command = [sys.executable, "-m", "pue.benchmarks.latency_worker"]
    try:
        completed = subprocess.run(command, input=spec.to_json(), capture_output=True, text=True, timeout=timeout_s)
        stdout, stderr, code = completed.stdout, completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = f"timed out after {timeout_s:.0f} s"
        code = None
    outcome = parse_worker_output(stdout)
    if code != 0 or len(outcome.batches) < len(set(spec.batch_sizes)):
        outcome.error = _describe_failure(code, stderr)
    return outcome


def parse_worker_output(stdout: str) -> WorkerOutcome:
    outcome = WorkerOutcome()
    for line in stdout.splitlines():
        if line.startswith(LOADED_PREFIX):
            outcome.loaded = json.loads(line[len(LOADED_PREFIX) :])
        elif line.startswith(BATCH_PREFIX):
            outcome.batches.append(json.loads(line[len(BATCH_PREFIX) :]))
    return outcome


def _describe_failure(code: int | None, stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-STDERR_TAIL_LINES:]) if lines else "no output on stderr"
    if code is None:
        return tail
    if code < 0:
        hint = " (SIGKILL: out of memory?)" if code == -9 else ""
        return f"worker killed by signal {-code}{hint}: {tail}"
    if code == 0:
        return f"worker exited without reporting every batch size: {tail}"
    return f"worker exited with code {code}: {tail}"


# ------------------------------------------------------------------------------------------------ helpers


def _check_settings(
    bundles: Sequence[Any], batch_sizes: Sequence[int], warmup: int, iters: int, patches_per_slide: int
) -> list[int]:
    if not bundles:
        raise PueError("no bundle to benchmark", "pass at least one bundle directory")
    sizes = sorted({int(size) for size in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise PueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if warmup < 0 or iters < 1:
        raise PueError(f"need warmup >= 0 and iters >= 1, got warmup {warmup}, iters {iters}")
    if patches_per_slide < 1:
        raise PueError(f"patches per slide must be positive, got {patches_per_slide}")
    return sizes


def _bundle_targets(bundles: Sequence[str | Path]) -> list[tuple[str, Path, Manifest]]:
    targets, seen = [], {}
    for bundle in bundles:
        path = Path(bundle)
        manifest = read_manifest(path)
        name = path.resolve().name
        seen[name] = seen.get(name, 0) + 1
        targets.append((name if seen[name] == 1 else f"{name} ({seen[name]})", path, manifest))
    return targets


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _heldout() -> list[Path]:
    from pue.data import patch_set

    return patch_set("heldout")


def _count_flops(
    targets: list[tuple[str, Path, Manifest]], checkpoint: Any, patches_per_slide: int, notes: list[str]
) -> list[dict[str, Any]]:
    """FLOPs per patch for each source checkpoint: from its config with --reference, else from the graphs."""
    models: dict[str, dict[str, Any]] = {}
    for name, path, manifest in targets:
        source = manifest.source_checkpoint
        count: FlopCount | None = None
        try:
            sequence = image_sequence_length(path, manifest)
            if checkpoint is not None:
                count = _config_flops(checkpoint.config, manifest, sequence)
            if count is None and source.sha256 not in models:
                count = graph_flops(path, manifest, sequence)
        except PueError as exc:
            notes.append(f"FLOPs of {name} not counted: {exc}")
        if count is not None and source.sha256 not in models:
            models[source.sha256] = {
                "source_checkpoint": source.name,
                "sha256": source.sha256,
                "tile_size": manifest.tile_size,
                "bundles": [],
                "flops": count.to_dict(),
                "gpu_best_case": gpu_best_case(count.total, patches_per_slide),
            }
        if source.sha256 in models:
            models[source.sha256]["bundles"].append(str(path))
    if checkpoint is not None and models:
        next(iter(models.values()))["reference"] = str(checkpoint.path)
    return list(models.values())


def _config_flops(config: Any, manifest: Manifest, sequence: int) -> FlopCount | None:
    """The count from the checkpoint's config, or None where the config is not one of a fixed-size ViT tower (the
    Qwen-VL architectures): their graphs are counted instead."""
    try:
        return patch_flops(config, bundle_crops(manifest), manifest.tokens_per_image, sequence)
    except PueError:
        return None


def _flops_of(path: str, models: list[dict[str, Any]]) -> int | None:
    for entry in models:
        if path in entry["bundles"] or path == entry.get("reference"):
            return entry["flops"]["total"]
    return None


def _schema_version() -> int:
    from pue.benchmarks.report import SCHEMA_VERSION

    return SCHEMA_VERSION
