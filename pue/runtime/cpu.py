"""The CPU cores this process may use and the memory free for it: one definition for thread counts, resource plans,
benchmark notes and reports."""

from __future__ import annotations

import os
from pathlib import Path


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
    """The feature flags /proc/cpuinfo lists for this CPU (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def saturating_u8s8() -> bool:
    """Whether onnxruntime's u8×s8 kernels can saturate here: an x86 CPU with no VNNI or AMX int8 instruction
    (AVX2 and AVX-512F sum pairs of u8·s8 products in int16). ARM's int8 kernels accumulate in int32."""
    import platform

    if platform.machine().lower() not in X86_MACHINES:
        return False
    flags = cpu_flags()
    return bool(flags) and not any(flag in flags for flag in INT8_DOT_PRODUCT_FLAGS)
