"""The CPU cores this process may use and the memory free for it: one definition for thread counts, resource plans,
benchmark notes and reports."""

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


GiB = 1024**3


def available_memory_bytes() -> int | None:
    """Memory the kernel says a new program can use without swapping (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products accumulated in int32


def cpu_flags() -> frozenset[str]:
    """The feature flags /proc/cpuinfo lists for this CPU (x86 "flags", Arm "Features"; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def saturating_u8s8() -> bool:
    """Whether onnxruntime's u8×s8 kernels can saturate here: an x86 CPU with no VNNI or AMX int8 instruction
    (AVX2 and AVX-512F sum pairs of u8·s8 products in int16). ARM's int8 kernels accumulate in int32."""
    if platform.machine().lower() not in X86_MACHINES:
        return False
    flags = cpu_flags()
    return bool(flags) and not any(flag in flags for flag in INT8_DOT_PRODUCT_FLAGS)


def cpu_info() -> dict[str, Any]:
    """Model name, logical CPUs, CPUs this process may use, and the matrix-relevant instruction-set flags."""
    model: str | None = None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model"):
                    model = value.strip()
                    break
    except OSError:
        pass
    flags = cpu_flags()
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
