"""Saved embeddings in HOMIE's `--embeddings_output` layout: write a run's, read anyone's.

HOMIE's `eval_path.py` saves one `.npz` per task run (`np.savez`, no pickles) with

* `query_embeddings` (Q, D) and `candidate_embeddings` (C, D): the rows **sorted by id**;
* `query_ids` (Q,) and `candidate_ids` (C,): the dataset index of each row in the order the batches were
  gathered, **not sorted** (under several processes they interleave); a row's id is its record's position in
  the data file (for `zeroshot` candidates, its prompt's position; `composedretrieval` candidates are the
  distinct targets sorted by name; `mcq` candidates every option of every record, in order);
* `task` (`retrieval`, `zeroshot`, `vqa`, `composedretrieval`, `mcq`, …), `model_id`, `data_path`.

So row r of an embeddings matrix belongs to id `sorted(ids)[r]`, and the ids must be exactly 0 … N-1. pue
writes the same keys (ids in order) plus `pue_task`, `pue_name`, `pue_backend` and `pue_precision`, which
name the task folder and the run; a file without them is matched to the task folder by its `task` and sizes.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pue.benchmarks.pmeb.homie import HOMIE_TASKS, record_indices, record_layout
from pue.benchmarks.pmeb.tasks import Task
from pue.errors import PueError

_REQUIRED = ("query_embeddings", "query_ids", "candidate_embeddings", "candidate_ids", "task")


@dataclass
class SavedEmbeddings:
    path: Path
    task_kind: str  # HOMIE's task name
    query: np.ndarray  # record-level rows, in id order
    candidate: np.ndarray
    name: str
    backend: str
    precision: str
    pue_task: str | None


def write_saved_embeddings(
    path: Path, task: Task, embeddings: dict[str, np.ndarray], name: str, backend: str, precision: str
) -> Path:
    """One run's embeddings of one task as a HOMIE-layout npz (written atomically)."""
    query, candidate = record_layout(task, embeddings)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(
                out,
                query_embeddings=np.asarray(query, np.float32),
                query_ids=np.arange(len(query), dtype=np.int64),
                candidate_embeddings=np.asarray(candidate, np.float32),
                candidate_ids=np.arange(len(candidate), dtype=np.int64),
                task=np.asarray(HOMIE_TASKS[task.form]),
                model_id=np.asarray(name),
                data_path=np.asarray(str(task.files[-1])),
                pue_task=np.asarray(task.name),
                pue_name=np.asarray(name),
                pue_backend=np.asarray(backend),
                pue_precision=np.asarray(precision),
            )
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_saved_embeddings(path: Path) -> SavedEmbeddings:
    """Read and check a HOMIE-layout npz; refuses ids that are not a permutation of 0 … N-1."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as stored:
            values = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PueError(f"{path}: cannot be read as an .npz file ({exc})") from exc
    absent = [key for key in _REQUIRED if key not in values]
    if absent:
        raise PueError(
            f"{path}: missing {', '.join(absent)}",
            f"a HOMIE embeddings file holds {', '.join(_REQUIRED)} (HOMIE's --embeddings_output)",
        )
    rows = {}
    for side in ("query", "candidate"):
        embeddings, ids = np.asarray(values[f"{side}_embeddings"]), np.asarray(values[f"{side}_ids"])
        if embeddings.ndim != 2 or ids.ndim != 1 or len(ids) != len(embeddings):
            raise PueError(
                f"{path}: {side}_embeddings has shape {embeddings.shape} for {ids.shape} {side}_ids",
                "expected (N, dimension) embeddings and N ids",
            )
        if not np.issubdtype(ids.dtype, np.integer) or not np.array_equal(np.sort(ids), np.arange(len(ids))):
            raise PueError(
                f"{path}: {side}_ids are not the record positions 0 … {len(ids) - 1} (duplicates or gaps)",
                "a multi-process HOMIE run can repeat padded rows; save from one process",
            )
        if not np.all(np.isfinite(embeddings)):
            raise PueError(f"{path}: {side}_embeddings hold NaN or inf")
        rows[side] = embeddings.astype(np.float32)
    if rows["query"].shape[1] != rows["candidate"].shape[1]:
        raise PueError(f"{path}: query and candidate embeddings have different dimensions")

    def text(key: str, default: str | None) -> str | None:
        return str(values[key]) if key in values else default

    return SavedEmbeddings(
        path=path,
        task_kind=str(values["task"]),
        query=rows["query"],
        candidate=rows["candidate"],
        name=text("pue_name", None) or text("model_id", None) or path.stem,
        backend=text("pue_backend", "saved") or "saved",
        precision=text("pue_precision", "unknown") or "unknown",
        pue_task=text("pue_task", None),
    )


def match_task(saved: SavedEmbeddings, tasks: list[Task]) -> Task:
    """The task folder a saved file belongs to: by its `pue_task` name, else the only one of its kind and sizes."""
    if saved.pue_task is not None:
        named = [t for t in tasks if t.name == saved.pue_task]
        if named:
            return _check(saved, named[0])
    fitting = [t for t in tasks if HOMIE_TASKS.get(t.form) == saved.task_kind and _sizes(t) == _saved_sizes(saved)]
    if len(fitting) == 1:
        return _check(saved, fitting[0])
    found = ", ".join(f"{t.name} ({HOMIE_TASKS.get(t.form)}, {_sizes(t)})" for t in tasks)
    raise PueError(
        f"{saved.path}: {'several' if fitting else 'no'} task folder(s) fit a {saved.task_kind!r} run with "
        f"{_saved_sizes(saved)} query and candidate rows; tasks: {found}",
        "pass --data the task folder these embeddings were computed on (or --tasks NAME)",
    )


def _check(saved: SavedEmbeddings, task: Task) -> Task:
    expected = HOMIE_TASKS[task.form]
    if saved.task_kind != expected:
        raise PueError(f"{saved.path}: holds a {saved.task_kind!r} run, but task {task.name} is HOMIE's {expected!r}")
    if _sizes(task) != _saved_sizes(saved):
        raise PueError(
            f"{saved.path}: {_saved_sizes(saved)} query and candidate rows, task {task.name} has {_sizes(task)}",
            "the embeddings were computed on another version of the data",
        )
    return task


def _sizes(task: Task) -> tuple[int, int]:
    layout = record_indices(task)
    return len(layout["query"][1]), len(layout["candidate"][1])


def _saved_sizes(saved: SavedEmbeddings) -> tuple[int, int]:
    return len(saved.query), len(saved.candidate)
