"""One latency measurement in a process of its own: `python -m pue.benchmarks.latency_worker [SPEC_JSON]`.

The spec (JSON, as the first argument or on stdin) names one bundle or one PyTorch reference, the device, the
batch sizes, warm-up and timed iterations, the image paths and the thread count. The worker loads the model,
then for each batch size (ascending) runs `warmup` untimed and `iters` timed calls of `embed_images` on a batch
filled by cycling the image paths, and prints one line per finished batch size:

    PUE_LOADED {"precision": …, "backend": …, "load_s": …, …}
    PUE_BATCH {"batch_size": 1, "latencies_ms": […], "stage_ms": {…}, "peak_memory_mb": …}

so a worker that dies at a large batch (out of memory) still reports the smaller ones. Images are passed as
paths: JPEG decoding and resizing to the tile are part of the measured preprocess stage, as in a real
whole-slide pipeline that reads patches from disk. Peak memory is this process's maximum resident set size
(`ru_maxrss`) after the batch, plus the CUDA allocator's peak for the PyTorch reference on a GPU.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pue.errors import PueError

KINDS = ("bundle", "reference")
REFERENCE_DTYPES = ("float32", "bfloat16", "float16")
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
LOADED_PREFIX = "PUE_LOADED "
BATCH_PREFIX = "PUE_BATCH "
STAGES = ("preprocess", "tokenize", "vision", "decoder")


@dataclass
class WorkerSpec:
    """What one worker measures. `recipe`, `tile_size` and `embedding_dim` (a Matryoshka cut, None: the model's
    width) apply to the reference (taken from the bundle)."""

    kind: str
    path: str
    images: list[str]
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 2
    iters: int = 10
    device: str = "cpu"
    threads: int | None = None
    dtype: str = "float32"
    backend: str = "auto"
    tile_size: int = 224
    recipe: dict[str, Any] | None = None
    embedding_dim: int | None = None
    images_per_row: int = 1  # > 1: every row is one query of that many images (issue 16's multi-image row)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> WorkerSpec:
        if not isinstance(data, dict):
            raise PueError(f"a worker spec is a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        missing = sorted({"kind", "path", "images"} - set(data))
        if unknown or missing:
            raise PueError(f"bad worker spec: missing {missing}, unknown {unknown}", f"fields are {sorted(known)}")
        spec = cls(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.images, list) or not self.images or not all(isinstance(p, str) for p in self.images):
            problems.append("images must be a non-empty list of paths")
        if (
            not isinstance(self.batch_sizes, list)
            or not self.batch_sizes
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.batch_sizes)
        ):
            problems.append(f"batch_sizes must be a non-empty list of positive integers, got {self.batch_sizes!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            problems.append(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.iters, int) or self.iters < 1:
            problems.append(f"iters must be an integer >= 1, got {self.iters!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            problems.append(f"threads must be a positive integer or null, got {self.threads!r}")
        if isinstance(self.images_per_row, bool) or not isinstance(self.images_per_row, int) or self.images_per_row < 1:
            problems.append(f"images_per_row must be a positive integer, got {self.images_per_row!r}")
        if self.kind == "reference" and self.dtype not in REFERENCE_DTYPES:
            problems.append(f"dtype must be one of {REFERENCE_DTYPES}, got {self.dtype!r}")
        if problems:
            raise PueError("bad worker spec: " + "; ".join(problems))


def parse_spec(text: str) -> WorkerSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PueError(f"the worker spec is not valid JSON: {exc}") from exc
    return WorkerSpec.from_dict(data)


def batch_of(images: list[str], batch_size: int, step: int) -> list[str]:
    """The `step`-th batch: the image list cycled, so consecutive batches see different patches."""
    start = step * batch_size
    return [images[(start + offset) % len(images)] for offset in range(batch_size)]


def rows_of(images: list[str], images_per_row: int) -> list[list[str]]:
    """A batch's images cut into rows of `images_per_row` consecutive images (one query each)."""
    return [images[start : start + images_per_row] for start in range(0, len(images), images_per_row)]


def peak_rss_mb() -> float:
    """This process's maximum resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# --------------------------------------------------------------------------------------------- the two kinds


class _BundleTarget:
    def __init__(self, spec: WorkerSpec) -> None:
        from pue.runtime import Embedder

        self.embedder = Embedder.load(
            spec.path, backend=spec.backend, device=spec.device, batch_size=max(spec.batch_sizes), threads=spec.threads
        )
        manifest = self.embedder.manifest
        self.info = {"precision": manifest.precision, "backend": self.embedder.backend_name, "threads": spec.threads}
        self.images_per_row = spec.images_per_row

    def embed(self, images: list[str]) -> Any:
        if self.images_per_row > 1:
            rows = rows_of(images, self.images_per_row)
            return self.embedder.embed_image_sets(rows, batch_size=len(rows))
        return self.embedder.embed_images(images, batch_size=len(images))

    def stage_seconds(self) -> dict[str, float]:
        return self.embedder.stage_times()

    def gpu_peak_mb(self) -> float | None:
        return None


class _TimedProcessor:
    """The HF processor with its calls timed (pixels and tokens: the reference's preprocess stage)."""

    def __init__(self, processor: Any, record: Callable[[str, float], None]) -> None:
        self._processor = processor
        self._record = record

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._processor(*args, **kwargs)
        finally:
            self._record("preprocess", time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


class _ReferenceTarget:
    """`ReferenceEmbedder` with its stages timed by wrapping, on this instance only: loading and fitting tiles
    plus the HF processor (preprocess, tokenization included), the model's `get_image_features` (vision), and
    the rest of the forward pass with pooling (decoder)."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from pue.export import ReferenceEmbedder
        from pue.export.recipe import recipe_from_dict

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.torch = torch
        self.on_cuda = spec.device.startswith("cuda")
        recipe = recipe_from_dict(spec.recipe, "the bundle's recipe") if spec.recipe else None
        self.reference = ReferenceEmbedder.load(
            spec.path,
            device=spec.device,
            dtype=spec.dtype,
            tile_size=spec.tile_size,
            recipe=recipe,
            batch_size=max(spec.batch_sizes),
            embedding_dim=spec.embedding_dim,
        )
        self.seconds = {"preprocess": 0.0, "vision": 0.0}
        self.total = 0.0
        self.images_per_row = spec.images_per_row
        reference = self.reference
        reference.tiles = self._timed("preprocess", reference.tiles)
        reference.processor = _TimedProcessor(reference.processor, self._add)
        base = reference.model.model
        base.get_image_features = self._timed("vision", base.get_image_features)
        self.info = {
            "precision": PRECISION_OF_DTYPE[spec.dtype],
            "backend": "pytorch",
            "threads": torch.get_num_threads(),
        }

    def _add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def _sync(self) -> None:
        if self.on_cuda:
            self.torch.cuda.synchronize()

    def _timed(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            started = time.perf_counter()
            try:
                result = function(*args, **kwargs)
                self._sync()
                return result
            finally:
                self._add(stage, time.perf_counter() - started)

        return timed

    def embed(self, images: list[str]) -> Any:
        rows = rows_of(images, self.images_per_row)
        self.reference.batch_size = len(rows)
        started = time.perf_counter()
        # numpy results: the device is synchronised
        if self.images_per_row > 1:
            result = self.reference.embed_image_sets(rows)
        else:
            result = self.reference.embed_images(images)
        self.total += time.perf_counter() - started
        return result

    def stage_seconds(self) -> dict[str, float]:
        # the HF processor tokenizes and makes pixels in one call: no separate tokenize stage
        measured = self.seconds["preprocess"] + self.seconds["vision"]
        return {
            "preprocess": self.seconds["preprocess"],
            "vision": self.seconds["vision"],
            "decoder": max(self.total - measured, 0.0),
        }

    def gpu_peak_mb(self) -> float | None:
        if not self.on_cuda:
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20


# --------------------------------------------------------------------------------------------- the run


def run_worker(spec: WorkerSpec, emit: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure `spec`; each result line is passed to `emit` as soon as it exists (default: printed)."""
    emit = emit or _print_line
    spec.validate()
    started = time.perf_counter()
    target = _BundleTarget(spec) if spec.kind == "bundle" else _ReferenceTarget(spec)
    loaded = {
        **target.info,
        "load_s": time.perf_counter() - started,
        "device": spec.device,
        "memory_after_load_mb": peak_rss_mb(),
    }
    emit(LOADED_PREFIX + json.dumps(loaded))
    batches = []
    for batch_size in sorted(set(spec.batch_sizes)):
        per_batch = batch_size * spec.images_per_row  # batch_size rows of images_per_row images
        for step in range(spec.warmup):
            target.embed(batch_of(spec.images, per_batch, step))
        before = target.stage_seconds()
        latencies = []
        for step in range(spec.iters):
            images = batch_of(spec.images, per_batch, spec.warmup + step)
            begin = time.perf_counter()
            target.embed(images)
            latencies.append((time.perf_counter() - begin) * 1000)
        after = target.stage_seconds()
        stage_ms = {
            stage: (after[stage] - before[stage]) * 1000 / spec.iters if stage in after else None for stage in STAGES
        }
        batch = {
            "batch_size": batch_size,
            "latencies_ms": latencies,
            "stage_ms": stage_ms,
            "peak_memory_mb": peak_rss_mb(),
            "peak_gpu_memory_mb": target.gpu_peak_mb(),
        }
        emit(BATCH_PREFIX + json.dumps(batch))
        batches.append(batch)
    return {**loaded, "batches": batches}


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        spec = parse_spec(args[0] if args else sys.stdin.read())
        run_worker(spec)
    except PueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
