"""The CPU cores this process may use: one definition for thread counts, benchmark notes and reports."""

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
