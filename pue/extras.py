"""The optional extras of pue, and the two rules every command follows when one is missing.

1. An extra a command cannot do its job without is checked before any work (`require_extras`): a missing one is a
   `MissingDependencyError` with the exact `pip install` line (exit 1), not a failure minutes later.
2. An extra that only adds an optional artefact (a plot) is checked where the artefact is made (`have_extra`): a
   missing one is a one-line warning and the artefact is skipped.

Stdlib only: the runtime, the CLI and the library all ask here.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from pue.errors import MissingDependencyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extra:
    """A pip extra of pue: the import names that show it is installed."""

    name: str
    modules: tuple[str, ...]
    provides: str


EXTRAS: dict[str, Extra] = {
    extra.name: extra
    for extra in (
        Extra("export", ("torch", "transformers", "onnx", "onnxscript"), "export from a PyTorch checkpoint"),
        Extra("cpu", ("onnxruntime",), "onnxruntime"),
        Extra("gpu", ("onnxruntime",), "onnxruntime with CUDA"),
        Extra("tensorrt", ("tensorrt", "cuda"), "TensorRT engines"),
        Extra("openvino", ("openvino",), "the OpenVINO CPU backend"),
        Extra("nncf", ("openvino", "nncf"), "NNCF's post-training quantization (scripts/nncf_openvino_int8.py)"),
        Extra("slides", ("openslide", "h5py", "pyarrow"), "whole-slide images through openslide, HDF5 and parquet"),
        Extra("ray", ("ray",), "the slide job on a Ray cluster (pue-embed slides --engine ray)"),
        Extra("bench", ("matplotlib",), "benchmark reports and plots"),
        Extra("serve", ("fastapi", "uvicorn", "prometheus_client"), "the embeddings server"),
    )
}

# Whole-slide formats only openslide reads (Pillow reads single-level .svs/.tif itself).
OPENSLIDE_ONLY_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_modules(extra: str) -> list[str]:
    """The import names of `extra` that are not installed (empty when it is)."""
    return [module for module in EXTRAS[extra].modules if not _installed(module)]


def have_extra(extra: str, artefact: str | None = None) -> bool:
    """Whether `extra` is installed; if not and `artefact` is named, one warning line says it is skipped."""
    missing = missing_modules(extra)
    if missing and artefact is not None:
        log.warning('%s not written: %s is not installed (pip install "pue[%s]")', artefact, missing[0], extra)
    return not missing


def require_extras(extras: Iterable[str], purpose: str, only: dict[str, tuple[str, ...]] | None = None) -> None:
    """Refuse before any work when an extra `purpose` cannot do without is missing, naming all of them at once.

    `only` narrows an extra to the modules the purpose really imports (quantization needs `onnx` from `export`,
    not torch).
    """
    wanted = list(dict.fromkeys(extras))
    narrowed = only or {}
    missing = [
        (extra, modules)
        for extra in wanted
        if (modules := [m for m in missing_modules(extra) if extra not in narrowed or m in narrowed[extra]])
    ]
    if not missing:
        return
    names = ",".join(extra for extra, _ in missing)
    packages = ", ".join(module for _, modules in missing for module in modules)
    raise MissingDependencyError(packages, names, purpose)


def package_versions(names: Iterable[str], always: Iterable[str] = ()) -> dict[str, str | None]:
    """Installed versions of the distributions `names` (pip names), read from their metadata: the one place pue
    collects versions (bundle manifests, benchmark environments, error messages). A name that is not installed is
    left out, or recorded as None when it is in `always`; "pue" falls back to the package's own version."""
    import importlib.metadata

    keep_missing = set(always)
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "pue":
                from pue import __version__

                versions[name] = __version__
            elif name in keep_missing:
                versions[name] = None
    return versions


def needs_openslide(paths: Iterable[object]) -> list[str]:
    """The paths among `paths` in a whole-slide format that only openslide reads."""
    return [str(p) for p in paths if str(p).lower().endswith(OPENSLIDE_ONLY_SUFFIXES)]
