"""Turn common dataset layouts into PMEB task folders.

* A class-per-folder tree (CRC-100K's `NCT-CRC-HE-100K/ADI/*.tif`, BACH's `Photos/Benign/*.tif`, ...) →
  a `classification` task: `labels.csv` (`image_name,label`), `prompts.json` (`classnames` from the folder
  names, or your synonyms; generic `templates` unless you give yours) and `task.json`.
* A caption CSV (one image and one caption per row, column names of your choosing: ARCH, Quilt, ...) →
  a `retrieval` task: `pairs.json` (`[{"img", "caption"}]`) and `task.json`.

Images are not copied: `image_root` points at them, relative to the task folder. The new folder is read
back with `load_task`, so a missing image is reported at once. Command line:

    python -m pue.benchmarks.pmeb.convert folders SRC OUT [--name N] [--classnames MAP.json] [--templates T.json]
    python -m pue.benchmarks.pmeb.convert captions CSV OUT --image-column C --caption-column C [--image-root DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pue.benchmarks.pmeb.tasks import CLASSNAME, Task, TaskError, load_task
from pue.errors import OutputExistsError, PueError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
# Generic zero-shot templates; replace them with your dataset's when you have them (prompt ensembling helps).
DEFAULT_TEMPLATES = [
    "CLASSNAME.",
    "a histopathology image of CLASSNAME.",
    "a histopathology image showing CLASSNAME.",
    "a photomicrograph of CLASSNAME.",
    "an image of CLASSNAME.",
]


def folders_to_classification(
    source: Path,
    out: Path,
    name: str | None = None,
    classnames: dict[str, list[str]] | None = None,
    templates: list[str] | None = None,
    overwrite: bool = False,
) -> Task:
    """One class per sub-folder of `source` (images found recursively) → a zero-shot task folder at `out`.

    `classnames` maps a folder name to its synonyms (default: the folder name, `_` read as a space).
    """
    source = Path(source).resolve()
    if not source.is_dir():
        raise TaskError(source, "is not a folder", "pass the folder that holds one sub-folder per class")
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    rows = [
        (image.relative_to(source).as_posix(), folder.name)
        for folder in folders
        for image in sorted(folder.rglob("*"))
        if image.suffix.lower() in IMAGE_SUFFIXES and image.is_file()
    ]
    found = sorted({label for _, label in rows})
    if not rows:
        raise TaskError(source, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class sub-folders")
    if classnames is None:
        classnames = {label: [label.replace("_", " ")] for label in found}
    classnames = {label: [names] if isinstance(names, str) else list(names) for label, names in classnames.items()}
    unknown, unnamed = sorted(set(classnames) - set(found)), sorted(set(found) - set(classnames))
    if unknown or unnamed:
        raise TaskError(
            source,
            "class folders and --classnames disagree: "
            f"no folder for {unknown or 'none'}, no synonyms for {unnamed or 'none'}",
        )
    templates = list(templates or DEFAULT_TEMPLATES)
    if not all(isinstance(t, str) and CLASSNAME in t for t in templates):
        raise TaskError(source, f"every template must be a string containing the {CLASSNAME} placeholder")
    task_name = name or source.name
    out = _prepare(out, overwrite)
    _write(out / "labels.csv", labels_csv(rows))
    _write(
        out / "prompts.json",
        json.dumps(
            {task_name: {"classnames": {label: classnames[label] for label in found}, "templates": templates}},
            indent=1,
            ensure_ascii=False,
        )
        + "\n",
    )
    _write_task_json(
        out,
        {
            "name": task_name,
            "meta_task": "classification",
            "labels": "labels.csv",
            "prompts": "prompts.json",
            "image_root": _relative(source, out),
        },
    )
    return load_task(out)


def captions_to_retrieval(
    csv_path: Path,
    out: Path,
    image_column: str = "image",
    caption_column: str = "caption",
    image_root: Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Task:
    """A CSV with one image and one caption per row → a retrieval task folder at `out`.

    Image names are read relative to `image_root` (default: the CSV's folder).
    """
    csv_path = Path(csv_path).resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in (image_column, caption_column) if c not in columns]
            if missing:
                raise TaskError(
                    csv_path,
                    f"has no column(s) {', '.join(missing)}; found {', '.join(columns)}",
                    "name the right ones with --image-column and --caption-column",
                )
            pairs = []
            for row in reader:
                image, caption = (row[image_column] or "").strip(), (row[caption_column] or "").strip()
                if not image or not caption:
                    raise TaskError(csv_path, f"line {reader.line_num} has an empty image or caption")
                pairs.append({"img": image, "caption": caption})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TaskError(csv_path, f"cannot be read as CSV: {exc}") from exc
    if not pairs:
        raise TaskError(csv_path, "has no rows: the task would be empty")
    root = Path(image_root).resolve() if image_root is not None else csv_path.parent
    out = _prepare(out, overwrite)
    _write(out / "pairs.json", json.dumps(pairs, indent=1, ensure_ascii=False) + "\n")
    _write_task_json(
        out,
        {
            "name": name or csv_path.stem,
            "meta_task": "retrieval",
            "data": "pairs.json",
            "image_root": _relative(root, out),
        },
    )
    return load_task(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pue.benchmarks.pmeb.convert",
        description="Make PMEB task folders from class folders or caption CSVs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    folders = commands.add_parser("folders", help="class-per-folder images → zero-shot classification task")
    folders.add_argument("source", type=Path)
    folders.add_argument("out", type=Path)
    folders.add_argument("--name")
    folders.add_argument("--classnames", type=Path, help="JSON {folder name: [synonyms]}")
    folders.add_argument("--templates", type=Path, help="JSON list of templates containing CLASSNAME")
    folders.add_argument("--overwrite", action="store_true")
    captions = commands.add_parser("captions", help="caption CSV → image-text retrieval task")
    captions.add_argument("csv", type=Path)
    captions.add_argument("out", type=Path)
    captions.add_argument("--image-column", default="image")
    captions.add_argument("--caption-column", default="caption")
    captions.add_argument("--image-root", type=Path)
    captions.add_argument("--name")
    captions.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "folders":
            task = folders_to_classification(
                args.source,
                args.out,
                args.name,
                classnames=_load_json(args.classnames) if args.classnames else None,
                templates=_load_json(args.templates) if args.templates else None,
                overwrite=args.overwrite,
            )
        else:
            task = captions_to_retrieval(
                args.csv, args.out, args.image_column, args.caption_column, args.image_root, args.name, args.overwrite
            )
    except PueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {task.meta_task} task {task.name!r} ({task.size} items) to {task.folder}")
    return 0


def _prepare(out: Path, overwrite: bool) -> Path:
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(str(out))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _relative(target: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(target, start)).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return target.as_posix()


def _load_json(path: Path) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TaskError(path, f"cannot be read as JSON: {exc}") from exc


def labels_csv(rows: list[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_name", "label"])
    writer.writerows(rows)
    return buffer.getvalue()


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _write_task_json(out: Path, spec: dict[str, str]) -> None:
    _write(out / "task.json", json.dumps(spec, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
