"""A bundle's TensorRT engines before they run: the `tensorrt` import, what this machine is, and each engine's bytes
and metadata checked against the manifest (an engine is an executable artifact: nothing unchecked is deserialized).

`pue.runtime.backends.tensorrt` runs the engines; `pue.export.tensorrt` builds them with the same helpers.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pue.bundle import FileEntry, Manifest, resolve_inside
from pue.errors import BundleError, MissingDependencyError, PueError
from pue.runtime.backends.cuda_device import CudaDevice
from pue.runtime.backends.tensorrt_compat import EngineMetadata, PlatformInfo, metadata_path

log = logging.getLogger(__name__)

GRAPHS = ("vision", "decoder")


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or an error naming the `tensorrt` extra."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError("tensorrt", "tensorrt", "TensorRT engines") from exc
    except OSError as exc:  # the wheel is there but its shared libraries are not
        raise PueError(
            f"tensorrt is installed but cannot load its libraries: {exc}",
            'reinstall it with: pip install --force-reinstall "pue[tensorrt]"',
        ) from exc
    return tensorrt


def platform_info(trt: ModuleType, device: CudaDevice) -> PlatformInfo:
    """This machine as engine metadata describes it."""
    return PlatformInfo(
        tensorrt_version=str(trt.__version__),
        gpu_name=device.name,
        compute_capability=device.compute_capability,
        cuda_runtime_version=device.runtime_version(),
        cuda_driver_version=device.driver_version(),
    )


def make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps errors (for our messages) and forwards warnings to `logging`."""

    class CapturingLogger(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            severities = trt.ILogger.Severity
            if severity in (severities.INTERNAL_ERROR, severities.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == severities.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CapturingLogger()


def numpy_dtype(trt: ModuleType, dtype: Any, where: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except (TypeError, KeyError) as exc:
        raise BundleError(
            f"{where} has TensorRT type {dtype}, which numpy cannot hold",
            "pue engines take and return float32, float16 and int64 tensors",
        ) from exc


def read_engine_bytes(path: Path, entry: FileEntry) -> bytes:
    """The engine file, checked against the manifest's size and sha256 from the very bytes TensorRT will load."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read engine '{entry.path}': {exc}", "the bundle is incomplete; rebuild it") from exc
    if len(data) != entry.size:
        raise BundleError(
            f"engine '{entry.path}' has {len(data)} bytes, the manifest records {entry.size}: the file is truncated "
            "or was replaced",
            "rebuild the engine bundle with pue-export trt",
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise BundleError(
            f"engine '{entry.path}' does not match its sha256 (expected {entry.sha256[:16]}…, found {actual[:16]}…); "
            "engines are executable, so it is not loaded",
            "rebuild the engine bundle with pue-export trt",
        )
    return data


def load_metadata(bundle_dir: Path, manifest: Manifest, graph: str) -> EngineMetadata:
    """The metadata beside a graph's engine; it must be listed (with its sha256) in the manifest's files."""
    plan = manifest.graphs[graph].file.path
    relative = metadata_path(plan)
    if relative not in {entry.path for entry in manifest.files.values()}:
        raise BundleError(
            f"the manifest lists no metadata '{relative}' for engine '{plan}'",
            "the engine bundle is incomplete; rebuild it with pue-export trt",
        )
    metadata = EngineMetadata.read(resolve_inside(bundle_dir, relative))
    if metadata.engine != plan or metadata.graph != graph:
        raise BundleError(
            f"'{relative}' describes {metadata.graph} engine '{metadata.engine}', not '{plan}'",
            "the engine bundle is inconsistent; rebuild it with pue-export trt",
        )
    return metadata


def recorded_command(manifest: Manifest) -> str:
    """The `pue-export trt` command that built this bundle (recorded at build time)."""
    build = manifest.export.tensorrt
    return (build.rebuild_command if build is not None else None) or "pue-export trt PARENT_BUNDLE -o ENGINE_BUNDLE"


def rebuild_hint(manifest: Manifest) -> str:
    return f"rebuild the engines on this machine with `{recorded_command(manifest)}`"
