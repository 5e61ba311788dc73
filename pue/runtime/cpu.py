"""The CPU cores this process may use: one definition for thread counts, benchmark notes and reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The instruction-set flags that decide matrix speed (reported with every benchmark and with a bf16 gate).
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "avx_vnni",
    "asimd",
    "bf16",
    "i8mm",
    "sve",
)


def usable_core_count() -> int:
    """Logical CPUs this process may run on (its affinity mask; containers and taskset narrow it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def physical_core_count() -> int:
    """Physical cores among the usable CPUs (hyper-threads share a core's matmul units)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return max(1, len(allowed))
    return max(1, len(cores))


def cpu_info() -> dict[str, Any]:
    """Model name, logical CPUs, CPUs this process may use, and the matrix-relevant instruction-set flags."""
    model: str | None = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_core_count(),
        "physical_cores": physical_core_count(),
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
    }


def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 matrix instructions (AVX512-BF16, AMX-BF16, or Arm's BF16)."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(cpu_info()["flags"]))
