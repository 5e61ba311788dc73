"""PMEB, the Pathology Multimodal Embedding Benchmark: tasks, metrics, the harness and its reports.

`run_pmeb` runs every task folder under a data directory on bundles and, with `reference=`, on the
PyTorch reference (cached), and reports each backend's metrics next to the reference's. The layout of a
task folder is in `pue.benchmarks.pmeb.tasks` and docs/pmeb.md; `pmeb_mini_dir()` is a tiny shipped set.
Importing this package needs neither torch nor onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

from pue.benchmarks.pmeb.evaluate import TaskResult, evaluate_task
from pue.benchmarks.pmeb.report import write_pmeb_report
from pue.benchmarks.pmeb.runner import run_pmeb
from pue.benchmarks.pmeb.tasks import META_TASKS, MissingImagesError, Task, TaskError, discover_tasks, load_task

__all__ = [
    "META_TASKS",
    "MissingImagesError",
    "Task",
    "TaskError",
    "TaskResult",
    "discover_tasks",
    "evaluate_task",
    "load_task",
    "pmeb_mini_dir",
    "run_pmeb",
    "write_pmeb_report",
]


def pmeb_mini_dir() -> Path:
    """The shipped `pmeb-mini` task folders (built from the package's held-out and background patches)."""
    return Path(__file__).resolve().parents[2] / "data" / "pmeb_mini"
