"""`pue-export trt`: a parent ONNX bundle (fp32, fp16, or int8 for TensorRT) → a bundle of TensorRT engines.

Each graph is parsed from its file (external weights resolve beside it) into a strongly typed network: the
precision is the ONNX graph's own (casts, explicit Q/DQ), so no precision builder flags are set (TensorRT 10
deprecated them and 11 removed them with implicit INT8 calibration). One optimisation profile per engine,
derived from the manifest (`profiles`). The engines then pass the fidelity gate against the parent, or nothing
is written. TensorRT is imported lazily: this module loads without it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pue.bundle import (
    Manifest,
    check_output_path,
    file_entry,
    read_manifest,
    resolve_inside,
    write_manifest,
)
from pue.derive import Derivation, derive_bundle
from pue.errors import BundleError, PueError
from pue.export.tensorrt.gate import run_engine_gate
from pue.export.tensorrt.metadata import (
    ENGINE_DIR,
    engine_manifest,
    engine_metadata,
    engine_path,
    rebuild_command,
)
from pue.export.tensorrt.profiles import (
    DEFAULT_BATCH,
    BatchRange,
    check_max_images,
    engine_profiles,
    parse_batch,
    resolve_max_seq,
)
from pue.fidelity import FidelityThresholds, GateReport
from pue.gate_set import GateSet
from pue.precisions import engine_precisions, engine_source_for, lookup
from pue.runtime.backends.base import parse_device
from pue.runtime.backends.cuda_device import CudaDevice, import_cudart
from pue.runtime.backends.tensorrt import TensorRTBackend
from pue.runtime.backends.tensorrt_compat import (
    AMPERE,
    HARDWARE_COMPAT_LEVELS,
    BuildFlags,
    EngineMetadata,
    PlatformInfo,
    ShapeRange,
    sm_name,
)
from pue.runtime.backends.tensorrt_engine import GRAPHS, import_tensorrt, make_logger, platform_info

log = logging.getLogger(__name__)

# our level names -> tensorrt.HardwareCompatibilityLevel members
HARDWARE_LEVEL_MEMBERS = {
    "none": "NONE",
    "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
    "ampere_plus": "AMPERE_PLUS",
}


@dataclass
class TrtOptions:
    """The flags of `pue-export trt`."""

    batch: BatchRange = field(default_factory=lambda: parse_batch(DEFAULT_BATCH))
    max_seq: int | None = None
    max_images: int = 1  # images one row may hold (the profiles' image-count dimension)
    timing_cache: Path | None = None
    workspace_gb: float | None = None
    version_compatible: bool = False
    hardware_compat: str = "none"
    device: str = "cuda"

    def flags(self) -> BuildFlags:
        workspace = None if self.workspace_gb is None else int(self.workspace_gb * 2**30)
        cache = None if self.timing_cache is None else str(self.timing_cache)
        return BuildFlags(True, self.version_compatible, self.hardware_compat, workspace, cache)


@dataclass
class BuiltEngine:
    plan: Any  # bytes or TensorRT's IHostMemory (buffer protocol)
    seconds: float
    timing_cache: bytes


@dataclass
class EngineBundleResult:
    bundle: Path
    engines: dict[str, EngineMetadata]
    gate: GateReport
    timings: dict[str, float]
    manifest: Manifest


def normalise_hardware_compat(level: str) -> str:
    name = str(level).strip().lower().replace("-", "_").replace("+", "_plus")
    if name not in HARDWARE_COMPAT_LEVELS:
        raise PueError(f"unknown --hardware-compat {level!r}", f"choose one of: {', '.join(HARDWARE_COMPAT_LEVELS)}")
    return name


def check_parent(manifest: Manifest, parent: Path) -> None:
    """Refuse bundles TensorRT should not be built from, with the command that makes a suitable one."""
    if manifest.backend == TensorRTBackend.name:
        raise PueError(
            f"{parent} already holds TensorRT engines",
            "build engines from the ONNX bundle it was made from (its lineage names it)",
        )
    precision, target = manifest.precision, manifest.target
    source = engine_source_for(precision)
    if source is None:
        takes = engine_precisions()
        raise PueError(
            f"{parent} has precision '{precision}'; pue-export trt takes {', '.join(takes[:-1])} or {takes[-1]} bundles"
        )
    spec = lookup(precision, target)  # the manifest's own target: graphs made for onnxruntime stay refused
    if spec is None or not spec.engine_source:
        if spec is not None and spec.precision != source.precision:
            reason = spec.note
        else:
            reason = f"its graphs were made for target '{target}'"
            if spec is not None and spec.note:
                reason += f" ({spec.note})"
        wanted = source.precision
        raise PueError(
            f"{parent} is a {precision} bundle for target '{target}': {reason}; TensorRT needs a bundle quantized "
            "with --target tensorrt",
            f"make one with `pue-export quantize FP32_BUNDLE -o OUT --precision {wanted} --target tensorrt`",
        )
    missing = [name for name in GRAPHS if name not in manifest.graphs]
    if missing:
        raise BundleError(f"{parent} has no {' or '.join(missing)} graph", "rebuild it with pue-export onnx")


def _read_timing_cache(path: Path | None) -> bytes:
    if path is None or not path.exists():
        return b""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PueError(f"cannot read the timing cache {path}: {exc}", "pass another --timing-cache path") from exc


def _write_timing_cache(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


def _progress_monitor(trt: ModuleType, graph: str, say: Callable[[str], None]) -> Any:
    """Reports TensorRT's top-level build phases (TensorRT 10+ IProgressMonitor), or None when it has none."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                say(f"{graph}: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            return None

    return Monitor()


def build_engine(
    trt: ModuleType,
    graph: str,
    onnx_path: Path,
    profile: dict[str, ShapeRange],
    flags: BuildFlags,
    timing_cache: bytes,
    say: Callable[[str], None],
) -> BuiltEngine:
    """Parse one ONNX graph into a strongly typed network and build its serialized engine."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise PueError(
            f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(errors[:3])}",
            "root graphs use standard ONNX ops only; report this with the bundle's manifest",
        )
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profile):
        raise BundleError(
            f"{onnx_path.name} takes inputs {names}, the manifest describes {sorted(profile)}",
            "the bundle does not follow the pue graph contract; rebuild it with pue-export onnx",
        )
    config = builder.create_builder_config()
    if flags.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, flags.workspace_bytes)
    if flags.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if flags.hardware_compat != "none":
        member = HARDWARE_LEVEL_MEMBERS[flags.hardware_compat]
        if not hasattr(trt.HardwareCompatibilityLevel, member):
            raise PueError(
                f"TensorRT {trt.__version__} has no hardware compatibility level {member}",
                "choose another --hardware-compat level or upgrade TensorRT",
            )
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, member)
    optimisation = builder.create_optimization_profile()
    for name, shapes in profile.items():
        optimisation.set_shape(name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(optimisation)
    cache = config.create_timing_cache(timing_cache)
    if not config.set_timing_cache(cache, False):
        say(f"{graph}: the timing cache was made for another GPU or TensorRT; starting a fresh one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    monitor = _progress_monitor(trt, graph, say)
    if monitor is not None:
        config.progress_monitor = monitor
    say(f"{graph}: building the engine from {onnx_path.name} (this takes a while)")
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if plan is None:
        detail = "; ".join(logger.errors[-3:]) or "no message from TensorRT"
        raise PueError(
            f"TensorRT failed to build the {graph} engine ({detail})",
            "rerun with --debug for TensorRT's log; a larger --workspace or a smaller --batch maximum or "
            "--max-seq needs less GPU memory",
        )
    return BuiltEngine(plan, seconds, bytes(config.get_timing_cache().serialize()))


def open_build_gpu(device: str) -> tuple[ModuleType, CudaDevice, PlatformInfo]:
    """TensorRT, cuda-python and the GPU, or a clear error naming what is missing (nothing written yet)."""
    parsed = parse_device(device)
    if not parsed.is_cuda:
        raise PueError(
            f"TensorRT engines are built on the GPU they will run on; --device {device!r} is not one",
            "use --device cuda or cuda:N",
        )
    trt = import_tensorrt()
    gpu = CudaDevice(import_cudart(), parsed.index or 0)
    return trt, gpu, platform_info(trt, gpu)


def build_engine_bundle(
    parent: str | Path,
    output: str | Path,
    options: TrtOptions | None = None,
    overwrite: bool = False,
    gate_set: GateSet | None = None,
    heldout: str | Path | None = None,
    thresholds: FidelityThresholds | None = None,
    progress: Callable[[str], None] | None = None,
) -> EngineBundleResult:
    options = options or TrtOptions()
    say = progress or log.info
    parent_dir, output = Path(parent), Path(output)
    manifest = read_manifest(parent_dir)
    check_parent(manifest, parent_dir)
    options.hardware_compat = normalise_hardware_compat(options.hardware_compat)
    if options.workspace_gb is not None and options.workspace_gb <= 0:
        raise PueError(f"--workspace {options.workspace_gb} must be a positive number of GB")
    max_images = check_max_images(manifest, options.max_images)
    max_seq = resolve_max_seq(manifest, options.max_seq, max_images)
    profiles = engine_profiles(manifest, options.batch, max_seq, max_images)
    check_output_path(output, overwrite)
    with derive_bundle(parent_dir, output, overwrite=overwrite) as child:
        trt, gpu, built_on = open_build_gpu(options.device)
        try:
            if options.hardware_compat == "ampere_plus" and built_on.compute_capability < AMPERE:
                raise PueError(
                    f"--hardware-compat ampere_plus needs an Ampere or newer GPU to build on; this one is "
                    f"{sm_name(built_on.compute_capability)} ({built_on.gpu_name})",
                    "drop --hardware-compat",
                )
            gate_set = (gate_set or GateSet.default(heldout)).up_to_images(max_images)
            say(
                f"building on {built_on.describe()}: batch {options.batch}, sequence 1..{max_seq}, "
                f"up to {max_images} image(s) per row"
            )
            flags = options.flags()
            command = rebuild_command(
                parent_dir.resolve(), output.resolve(), options.batch, max_seq, flags, options.workspace_gb, max_images
            )
            cache = _read_timing_cache(options.timing_cache)
            timings: dict[str, float] = {}
            engines: dict[str, EngineMetadata] = {}
            staging = child.staging
            (staging / ENGINE_DIR).mkdir()
            for graph in GRAPHS:
                source = resolve_inside(parent_dir, manifest.graphs[graph].file.path)
                built = build_engine(trt, graph, source, profiles[graph], flags, cache, say)
                cache = built.timing_cache
                with open(staging / engine_path(graph), "wb") as handle:
                    handle.write(built.plan)
                size = (staging / engine_path(graph)).stat().st_size
                engines[graph] = engine_metadata(graph, manifest, built_on, profiles[graph], flags, built.seconds, size)
                engines[graph].write(staging / ENGINE_DIR / f"{graph}.json")
                timings[f"build_{graph}_s"] = built.seconds
                say(f"{graph}: built in {built.seconds:.1f} s ({size / 2**20:.1f} MiB)")
            if options.timing_cache is not None:
                _write_timing_cache(options.timing_cache, cache)
                say(f"timing cache saved to {options.timing_cache}")
            result = _finish_bundle(
                child, engines, built_on, options, max_seq, command, timings, gate_set, thresholds, say
            )
        finally:
            gpu.close()
    return EngineBundleResult(output, engines, result[0], timings, result[1])


def _finish_bundle(
    child: Derivation,
    engines: dict[str, EngineMetadata],
    built_on: PlatformInfo,
    options: TrtOptions,
    max_seq: int,
    command: str,
    timings: dict[str, float],
    gate_set: GateSet,
    thresholds: FidelityThresholds | None,
    say: Callable[[str], None],
) -> tuple[GateReport, Manifest]:
    """Tokenizer, manifest, gate, fidelity.json: the engine bundle is complete or a GateFailedError is raised."""
    staging, parent, parent_dir = child.staging, child.parent, child.parent_dir
    tokenizer = child.link_from_parent(parent.tokenizer.file.path)
    files = {f"{ENGINE_DIR}/{g}.json": file_entry(staging, f"{ENGINE_DIR}/{g}.json") for g in engines}
    summary = {
        "parent_bundle": str(parent_dir.resolve()),
        "batch": str(options.batch),
        "max_seq": max_seq,
        "max_images": options.max_images,
        "build_flags": asdict(options.flags()),
        "built_on": built_on.to_dict(),
        "build_seconds": {graph: round(meta.build_seconds, 3) for graph, meta in engines.items()},
        "rebuild_command": command,
    }
    manifest = engine_manifest(
        parent,
        parent_dir,
        {g: file_entry(staging, engine_path(g)) for g in engines},
        files,
        tokenizer,
        built_on,
        options.batch,
        summary,
    )
    write_manifest(staging, manifest)
    started = time.perf_counter()
    report = run_engine_gate(staging, parent_dir, options.device, gate_set, thresholds, say)
    timings["gate_s"] = time.perf_counter() - started
    details = {"engines": {g: meta.to_dict() for g, meta in engines.items()}, "timings": timings}
    child.gate(report, "fidelity gate (TensorRT engines vs parent)", details)
    child.write_json("fidelity.json", report.to_dict())
    manifest.fidelity = {"gate": report.to_dict()}
    manifest.export.tensorrt.timings = timings
    child.commit(manifest, ["fidelity.json"])
    return report, manifest
