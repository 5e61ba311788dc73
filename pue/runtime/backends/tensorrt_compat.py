"""Engine metadata (`engines/<graph>.json`) and TensorRT's compatibility rules, checked before deserializing.

A TensorRT engine is tied to the TensorRT version and the GPU it was built on. Deserializing a foreign engine
fails with an opaque log line (or, worse, runs host code from the plan), so the runtime reads the metadata
written beside each engine and explains a mismatch with the command that rebuilds it. Plain Python: the rules
are tested without TensorRT or a GPU. The export side writes the same dataclasses (`pue.export.tensorrt`).
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pue.errors import BundleError

METADATA_SCHEMA_VERSION = 1
HARDWARE_COMPAT_LEVELS = ("none", "same_compute_capability", "ampere_plus")
AMPERE = (8, 0)
# Version-compatible engines may cross one major version boundary, and only these ones (TensorRT support matrix).
CROSS_MAJOR_VERSION_COMPATIBLE = {(8, 10), (10, 11)}
MIN_VERSION_COMPATIBLE = (8, 6)


def version_tuple(version: str) -> tuple[int, ...]:
    """ "10.14.1.48" -> (10, 14, 1, 48); suffixes like "rc1" or "+cuda12" are ignored."""
    numbers = []
    for part in str(version).split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
    if not numbers:
        raise BundleError(f"cannot read the version {version!r}", "expected a dotted version such as 10.14.1.48")
    return tuple(numbers)


def short_version(version: str) -> str:
    return ".".join(str(n) for n in version_tuple(version)[:3])


def sm_name(compute_capability: tuple[int, int] | list[int]) -> str:
    major, minor = compute_capability
    return f"sm_{major}{minor}"


def host_platform() -> str:
    """Engines are not portable across operating systems or CPU architectures: "linux-x86_64"."""
    return f"{platform.system().lower()}-{platform.machine().lower()}"


@dataclass(frozen=True)
class PlatformInfo:
    """What an engine depends on: TensorRT, CUDA, the GPU (name and compute capability), the OS."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    cuda_runtime_version: str = "unknown"
    cuda_driver_version: str = "unknown"
    os: str = field(default_factory=host_platform)

    def describe(self) -> str:
        version, sm = short_version(self.tensorrt_version), sm_name(self.compute_capability)
        return f"TensorRT {version} on {sm} ({self.gpu_name})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlatformInfo:
        values = dict(data)
        values["compute_capability"] = tuple(int(x) for x in values["compute_capability"])
        return cls(**values)


@dataclass(frozen=True)
class ShapeRange:
    """One input of an optimisation profile: the smallest, the tuned-for and the largest shape."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError(f"profile shapes differ in rank: {self.min}, {self.opt}, {self.max}")
        for low, mid, high in zip(self.min, self.opt, self.max, strict=True):
            if not 1 <= low <= mid <= high:
                raise ValueError(f"profile needs 1 <= min <= opt <= max in every dimension: {self}")

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeRange:
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


@dataclass(frozen=True)
class BuildFlags:
    """How an engine was built. Precision comes from the ONNX graph (strongly typed network): no precision flags."""

    strongly_typed: bool = True
    version_compatible: bool = False
    hardware_compat: str = "none"
    workspace_bytes: int | None = None
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.hardware_compat not in HARDWARE_COMPAT_LEVELS:
            raise ValueError(f"unknown hardware compatibility level {self.hardware_compat!r}")


@dataclass
class EngineMetadata:
    """`engines/<graph>.json`: everything needed to judge, before deserializing, whether an engine runs here."""

    graph: str
    engine: str
    precision: str
    source_onnx: str
    source_onnx_sha256: str
    built_on: PlatformInfo
    profiles: dict[str, ShapeRange]
    build_flags: BuildFlags
    build_seconds: float
    pue_version: str
    engine_bytes: int = 0
    schema_version: int = METADATA_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "graph": self.graph,
            "engine": self.engine,
            "engine_bytes": self.engine_bytes,
            "precision": self.precision,
            "source_onnx": self.source_onnx,
            "source_onnx_sha256": self.source_onnx_sha256,
            "built_on": self.built_on.to_dict(),
            "profiles": {name: shapes.to_dict() for name, shapes in self.profiles.items()},
            "build_flags": asdict(self.build_flags),
            "build_seconds": round(self.build_seconds, 3),
            "pue_version": self.pue_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineMetadata:
        if data.get("schema_version") != METADATA_SCHEMA_VERSION:
            raise BundleError(
                f"engine metadata schema_version is {data.get('schema_version')!r}, this pue reads "
                f"{METADATA_SCHEMA_VERSION}",
                "rebuild the engines with this version of pue-export trt",
            )
        try:
            return cls(
                graph=data["graph"],
                engine=data["engine"],
                engine_bytes=int(data.get("engine_bytes", 0)),
                precision=data["precision"],
                source_onnx=data["source_onnx"],
                source_onnx_sha256=data["source_onnx_sha256"],
                built_on=PlatformInfo.from_dict(data["built_on"]),
                profiles={name: ShapeRange.from_dict(shapes) for name, shapes in data["profiles"].items()},
                build_flags=BuildFlags(**data["build_flags"]),
                build_seconds=float(data["build_seconds"]),
                pue_version=data["pue_version"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"engine metadata is malformed: {exc!r}", "rebuild the engines with pue-export trt"
            ) from exc

    def write(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> EngineMetadata:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"cannot read engine metadata '{path}': {exc}", "rebuild the engines") from exc
        if not isinstance(data, dict):
            raise BundleError(f"engine metadata '{path}' is not a JSON object", "rebuild the engines")
        return cls.from_dict(data)

    def max_batch(self) -> int:
        return min(shapes.max[0] for shapes in self.profiles.values())

    def min_batch(self) -> int:
        return max(shapes.min[0] for shapes in self.profiles.values())


def metadata_path(engine_path: str) -> str:
    """`engines/vision.plan` -> `engines/vision.json` (the metadata lies beside its engine)."""
    return str(Path(engine_path).with_suffix(".json"))


def _version_problem(built: str, version_compatible: bool, installed: str) -> str | None:
    built_v, installed_v = version_tuple(built), version_tuple(installed)
    if not version_compatible:
        # the standard runtime needs major, minor, patch and build to match
        width = min(len(built_v), len(installed_v), 4)
        return None if built_v[:width] == installed_v[:width] else "a different TensorRT version"
    if built_v[:2] < MIN_VERSION_COMPATIBLE:
        return "TensorRT older than 8.6, which cannot make version-compatible engines"
    if installed_v[:3] < built_v[:3]:
        return "an older TensorRT than the one that built it (version compatibility only runs forward)"
    if built_v[0] != installed_v[0] and (built_v[0], installed_v[0]) not in CROSS_MAJOR_VERSION_COMPATIBLE:
        return f"TensorRT {installed_v[0]}, which does not run version-compatible TensorRT {built_v[0]} engines"
    return None


def _hardware_problem(level: str, built: tuple[int, int], here: tuple[int, int]) -> str | None:
    if level == "ampere_plus":
        return None if tuple(here) >= AMPERE else "a GPU older than Ampere (hardware_compat ampere_plus needs sm_80+)"
    return None if tuple(built) == tuple(here) else "a GPU of another compute capability"


def check_engine_compatibility(metadata: EngineMetadata, here: PlatformInfo, rebuild_hint: str) -> list[str]:
    """Raise BundleError when TensorRT's rules say the engine cannot run here; return warnings otherwise.

    Rules (TensorRT support matrix): a standard engine needs the same TensorRT version and the same compute
    capability; `version_compatible` engines run on the same or a later TensorRT of the same major version (and
    TensorRT 10 ones on 11); `hardware_compat` "same_compute_capability" allows other GPU models of the same
    compute capability, "ampere_plus" any GPU from sm_80 on. Engines never cross operating systems.
    """
    built, flags = metadata.built_on, metadata.build_flags
    problems = []
    if built.os != here.os:
        problems.append(f"another platform ({built.os}, this machine is {here.os})")
    version = _version_problem(built.tensorrt_version, flags.version_compatible, here.tensorrt_version)
    if version:
        problems.append(version)
    hardware = _hardware_problem(flags.hardware_compat, built.compute_capability, here.compute_capability)
    if hardware:
        problems.append(hardware)
    if problems:
        raise BundleError(
            f"engine '{metadata.engine}' was built for {built.describe()}"
            f"{' (version-compatible)' if flags.version_compatible else ''}"
            f"{'' if flags.hardware_compat == 'none' else f' (hardware_compat {flags.hardware_compat})'}; "
            f"this machine has {here.describe()}, which is {'; '.join(problems)}",
            rebuild_hint,
        )
    warnings = []
    if flags.hardware_compat == "none" and built.gpu_name != here.gpu_name:
        warnings.append(
            f"engine '{metadata.engine}' was built on {built.gpu_name} and runs on {here.gpu_name} (same compute "
            f"capability {sm_name(here.compute_capability)}): TensorRT allows it, but its kernels were tuned for the "
            f"other GPU; {rebuild_hint} for the best latency"
        )
    return warnings


def profile_problem(input_name: str, shape: tuple[int, ...], shapes: ShapeRange) -> tuple[str, str] | None:
    """(what is wrong, the build flag that widens it) when `shape` lies outside the profile, else None."""
    if len(shape) != len(shapes.max):
        return (
            f"input '{input_name}' has rank {len(shape)}, the engine takes rank {len(shapes.max)} {list(shapes.max)}",
            "",
        )
    for axis, (got, low, high) in enumerate(zip(shape, shapes.min, shapes.max, strict=True)):
        if low <= got <= high:
            continue
        if axis == 0:
            what, flag = "batch", "--batch MIN:OPT:MAX"
        elif input_name in ("input_ids", "attention_mask") and axis == 1:
            what, flag = "sequence length (tokens per row)", "--max-seq N"
        elif input_name == "image_features" and axis == 1:
            what, flag = "image tokens per row (tokens_per_image for each of its images)", "--max-images N"
        else:
            what, flag = f"dimension {axis}", ""
        return (f"input '{input_name}' {what} is {got}, the engine's profile allows {low}..{high}", flag)
    return None
