"""What a benchmark ran on: CPU, cores, memory, GPU and driver, and the versions of the packages that matter.

Versions are read from the installed packages' metadata, so nothing heavy (torch, tensorrt) is imported just
to record them; the GPU comes from `nvidia-smi` when it exists.
"""

from __future__ import annotations

import datetime as _datetime
import platform
import shutil
import subprocess
from typing import Any

from pue.runtime.cpu import CPU_FLAGS, cpu_info, cpu_supports_bf16

# Package names as installed; onnxruntime-gpu and tensorrt's split wheels report under their own names.
VERSIONED_PACKAGES = (
    "pue",
    "numpy",
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "tensorrt-cu12",
    "tensorrt-cu13",
    "openvino",
    "tokenizers",
    "pillow",
    "matplotlib",
)


__all__ = ["CPU_FLAGS", "collect_environment", "cpu_info", "cpu_supports_bf16", "gpu_info", "package_versions"]


def collect_environment() -> dict[str, Any]:
    """A JSON-ready description of this machine and software, for the `environment` field of every report."""
    gpus = gpu_info()
    first = gpus[0] if gpus else {}
    return {
        "timestamp": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "memory_gb": _memory_gb(),
        "gpu": first.get("name"),  # the first GPU and its driver, for a one-line summary; all of them in "gpus"
        "driver": first.get("driver"),
        "gpus": gpus,
        "versions": package_versions(),
    }


def gpu_info() -> list[dict[str, Any]]:
    """One entry per GPU from nvidia-smi (name, driver, memory, compute capability); empty without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    fields = ("index", "name", "driver_version", "memory.total", "compute_cap")
    try:
        output = subprocess.run(
            [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [{"error": f"nvidia-smi failed: {exc}"}]
    gpus = []
    for line in output.strip().splitlines():
        values = [value.strip() for value in line.split(",")]
        if len(values) != len(fields):
            continue
        entry = dict(zip(("index", "name", "driver", "memory_mb", "compute_capability"), values, strict=True))
        gpus.append(entry)
    return gpus


def package_versions() -> dict[str, str | None]:
    from pue import extras

    # the report contract's fields are always present, null when not installed
    return extras.package_versions(VERSIONED_PACKAGES, always=("pue", "numpy", "torch", "onnxruntime", "tensorrt"))


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None
