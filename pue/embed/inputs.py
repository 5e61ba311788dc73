"""What `pue-embed slides INPUT...` embeds: slide files, folders, globs, or a CSV `slide_id,path[,mpp]`.

A slide's id is its file name without the suffix (`TCGA-01.svs` → `TCGA-01`) unless a CSV names it. A folder
contributes its slide and image files (not its subfolders: an MRXS slide's data folder is part of the slide).
A CSV's relative paths are relative to the CSV; its optional `mpp` column is the scan's µm/px and wins over the
file's metadata. Two slides with one id are refused: their outputs would overwrite each other.
"""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass
from pathlib import Path

from pue.errors import PueError

__all__ = ["SLIDE_SUFFIXES", "SlideInput", "is_slide_file", "resolve_inputs", "slide_id_of"]

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".png", ".jpg", ".jpeg",
)  # fmt: skip


@dataclass(frozen=True)
class SlideInput:
    """One slide to embed."""

    slide_id: str
    path: Path
    mpp: float | None = None  # from a CSV: the scan's µm/px, overriding the file's


def slide_id_of(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def is_slide_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES and not path.name.startswith(".")


def resolve_inputs(items: list[str]) -> list[SlideInput]:
    """Every slide named by `items` (files, folders, globs, CSV files), in the given order, each once."""
    slides: list[SlideInput] = []
    for item in items:
        path = Path(item)
        if any(char in item for char in "*?[") and not path.exists():
            matches = sorted(Path(match) for match in glob.glob(item, recursive=True))
            found = [SlideInput(slide_id_of(match), match) for match in matches if is_slide_file(match)]
            if not found:
                raise PueError(f"no slide files match {item}", hint=f"slide suffixes: {', '.join(SLIDE_SUFFIXES)}")
            slides.extend(found)
        elif path.is_dir():
            found = [SlideInput(slide_id_of(child), child) for child in sorted(path.iterdir()) if is_slide_file(child)]
            if not found:
                raise PueError(f"no slide files in folder {path}", hint=f"slide suffixes: {', '.join(SLIDE_SUFFIXES)}")
            slides.extend(found)
        elif path.suffix.lower() == ".csv" and path.is_file():
            slides.extend(read_slide_csv(path))
        elif path.is_file():
            slides.append(SlideInput(slide_id_of(path), path))
        else:
            raise PueError(f"input not found: {item}", hint="pass slide files, folders, globs or a CSV slide_id,path")
    return _unique(slides)


def read_slide_csv(path: Path) -> list[SlideInput]:
    """A CSV with a header `slide_id,path` and optionally `mpp`."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"slide_id", "path"} <= columns:
            raise PueError(
                f"CSV {path} needs the columns slide_id and path (and optionally mpp); found {sorted(columns)}"
            )
        slides = []
        for line, row in enumerate(reader, start=2):
            slide_path = Path(row["path"])
            if not slide_path.is_absolute():
                slide_path = path.parent / slide_path
            mpp = None
            if row.get("mpp") not in (None, ""):
                try:
                    mpp = float(row["mpp"])
                except ValueError:
                    mpp = -1.0
                if not mpp > 0:
                    raise PueError(f"CSV {path} line {line}: mpp must be a positive number, got {row['mpp']!r}")
            if not row["slide_id"]:
                raise PueError(f"CSV {path} line {line}: empty slide_id")
            slides.append(SlideInput(row["slide_id"], slide_path, mpp))
    if not slides:
        raise PueError(f"CSV {path} lists no slides")
    return slides


def _unique(slides: list[SlideInput]) -> list[SlideInput]:
    seen: dict[str, SlideInput] = {}
    result = []
    for slide in slides:
        previous = seen.get(slide.slide_id)
        if previous is None:
            seen[slide.slide_id] = slide
            result.append(slide)
        elif previous.path.resolve() != slide.path.resolve():
            raise PueError(
                f"two slides have the id {slide.slide_id}: {previous.path} and {slide.path}",
                hint="rename one, or list them in a CSV slide_id,path with distinct ids",
            )
    return result
