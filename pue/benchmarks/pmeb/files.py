"""Reading a PMEB task's files: JSON, JSON Lines and CSV, with errors that name the file, the item and the fix."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pue.errors import PueError

_SHOWN = 5  # how many offending names an error lists


class TaskError(PueError):
    """A PMEB task that cannot be read: `where` is the file (or folder), the message what is wrong."""

    def __init__(self, where: str | Path, message: str, hint: str | None = None) -> None:
        self.where = str(where)
        super().__init__(f"{where}: {message}", hint)


class MissingImagesError(TaskError):
    """Images a task names that do not exist; `missing` lists them all (the message shows the first few)."""

    def __init__(self, where: str | Path, missing: list[str], total: int, image_root: Path) -> None:
        self.missing = missing
        self.total = total
        super().__init__(
            where,
            f"{len(missing)} of {total} images do not exist under image_root {image_root}: {listing(missing)}",
            "fix the names or `image_root` in task.json (relative to the task folder)",
        )


# --- readers --------------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise TaskError(path, f"is not valid JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(path, f"cannot be read: {exc}") from exc


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """A JSON list of objects, or JSONL (one object per line): [(where, record)], never empty."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(path, f"cannot be read: {exc}") from exc
    records: list[tuple[str, Any]]
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise TaskError(
                        path,
                        f"line {number} is not valid JSON: {exc}",
                        "expected a JSON list of objects, or JSONL (one object per line)",
                    ) from exc
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(path, f"is not valid JSON: {exc}") from exc
        records = [(f"item {i}", item) for i, item in enumerate(loaded)]
    if not records:
        raise TaskError(path, "holds no records: the task is empty")
    for where, record in records:
        if not isinstance(record, dict):
            raise TaskError(path, f"{where} is a {type(record).__name__}, expected a JSON object")
    return records


def read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [(reader.line_num, {(k or "").strip(): v for k, v in row.items()}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TaskError(path, f"cannot be read as CSV: {exc}") from exc
    absent = [c for c in required if c not in columns]
    if absent:
        raise TaskError(
            path,
            f"needs the column(s) {', '.join(absent)}; found {', '.join(columns) or 'no header'}",
            f"the first line is the header: {','.join(required)}",
        )
    if not rows:
        raise TaskError(path, "has a header but no rows: the task is empty")
    return rows


def data_file(folder: Path, spec: dict[str, Any], key: str, spec_path: Path) -> Path:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise TaskError(spec_path, f"needs {key!r}: the name of the {key} file (relative to the task folder)")
    path = folder / value
    if not path.is_file():
        raise TaskError(
            path,
            f"does not exist (named by {key!r} in {spec_path.name})",
            "fix the file name in task.json, or add the file",
        )
    return path


def field_text(record: dict[str, Any], keys: tuple[str, ...], path: Path, where: str) -> str:
    for key in keys:
        if key in record:
            value = record[key]
            if not isinstance(value, str) or not value.strip():
                raise TaskError(path, f"{where}: {key!r} must be a non-empty string, found {value!r}")
            return value
    raise TaskError(path, f"{where} has no {' or '.join(repr(k) for k in keys)} (keys: {', '.join(record) or 'none'})")


def listing(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
