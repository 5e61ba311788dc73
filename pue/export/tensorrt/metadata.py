"""What an engine bundle records: the metadata beside each engine and the bundle's manifest.

The engine bundle's manifest is its parent's, with `backend` "tensorrt", `target` "tensorrt", the engines as
its graphs (`engines/<graph>.plan`, with sha256), their metadata and `fidelity.json` as files, lineage pointing at
the parent's manifest sha256, and the parent's `export` record with the build added (`export.tensorrt`).
"""

from __future__ import annotations

import copy
import dataclasses
import shlex
from pathlib import Path
from typing import Any

from pue import __version__
from pue.bundle import EngineBuildInfo, FileEntry, GraphSpec, Lineage, Manifest, manifest_sha256
from pue.choices import BundleTarget
from pue.export.tensorrt.profiles import BatchRange
from pue.runtime.backends.tensorrt import TensorRTBackend
from pue.runtime.backends.tensorrt_compat import BuildFlags, EngineMetadata, PlatformInfo, ShapeRange

ENGINE_DIR = "engines"


def engine_path(graph: str) -> str:
    return f"{ENGINE_DIR}/{graph}.plan"


def rebuild_command(
    parent: Path,
    output: Path,
    batch: BatchRange,
    max_seq: int,
    flags: BuildFlags,
    workspace_gb: float | None,
    max_images: int = 1,
) -> str:
    """The `pue-export trt` command line that rebuilds these engines (quoted for a shell)."""
    words = ["pue-export", "trt", str(parent), "-o", str(output), "--batch", str(batch), "--max-seq", str(max_seq)]
    if max_images > 1:
        words += ["--max-images", str(max_images)]
    if workspace_gb is not None:
        words += ["--workspace", f"{workspace_gb:g}"]
    if flags.version_compatible:
        words.append("--version-compatible")
    if flags.hardware_compat != "none":
        words += ["--hardware-compat", flags.hardware_compat]
    if flags.timing_cache:
        words += ["--timing-cache", flags.timing_cache]
    return shlex.join(words) + " --overwrite"


def engine_metadata(
    graph: str,
    parent: Manifest,
    built_on: PlatformInfo,
    profiles: dict[str, ShapeRange],
    flags: BuildFlags,
    build_seconds: float,
    engine_bytes: int,
) -> EngineMetadata:
    source = parent.graphs[graph].file
    return EngineMetadata(
        graph=graph,
        engine=engine_path(graph),
        engine_bytes=engine_bytes,
        precision=parent.precision,
        source_onnx=source.path,
        source_onnx_sha256=source.sha256,
        built_on=built_on,
        profiles=profiles,
        build_flags=flags,
        build_seconds=build_seconds,
        pue_version=__version__,
    )


def engine_manifest(
    parent: Manifest,
    parent_dir: Path,
    engines: dict[str, FileEntry],
    files: dict[str, FileEntry],
    tokenizer: FileEntry,
    built_on: PlatformInfo,
    batch: BatchRange,
    summary: dict[str, Any],
) -> Manifest:
    """The engine bundle's manifest (fidelity is filled in once the gate has run)."""
    manifest = copy.deepcopy(parent)
    manifest.backend = TensorRTBackend.name
    manifest.target = BundleTarget.TENSORRT.value
    manifest.graphs = {
        name: GraphSpec(file=entry, inputs=parent.graphs[name].inputs, outputs=parent.graphs[name].outputs)
        for name, entry in engines.items()
    }
    manifest.tokenizer.file = tokenizer
    manifest.files = dict(files)
    manifest.default_batch_size = max(batch.min, min(parent.default_batch_size, batch.max))
    manifest.lineage = Lineage(
        parent_sha256=manifest_sha256(parent_dir),
        parent_precision=parent.precision,
        calibration=parent.lineage.calibration,
    )
    manifest.versions = {
        **parent.versions,
        "pue": __version__,
        "tensorrt": built_on.tensorrt_version,
        "cuda_runtime": built_on.cuda_runtime_version,
        "cuda_driver": built_on.cuda_driver_version,
    }
    manifest.fidelity = {}
    # the parent's export record (exporter, geometry, quantization) describes the engines' graphs too
    manifest.export = dataclasses.replace(manifest.export, tensorrt=EngineBuildInfo.from_dict(summary))
    return manifest
