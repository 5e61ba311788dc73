"""Scanner mode: poll a folder and embed each new slide once it is complete.

A scanner writes a slide over minutes, so a slide is taken only when its signature (the size and modification time
of the file, and of every file of a folder-based format: an MRXS slide's data folder beside it, a DICOM slide's
folder of `.dcm` files) has not changed for `settle` seconds. A slide is handed out once per signature: a slide
rescanned under the same name is handed out again (and the job redoes it, as its source changed). Hidden files
(a scanner's or pue's temporary names) are ignored. Paths are plain `pathlib` paths: Linux and macOS alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pue.embed.inputs import SlideInput, is_slide_file, slide_id_of

__all__ = ["FolderWatcher", "slide_signature"]

Signature = tuple[tuple[str, int, int], ...]


def slide_signature(path: Path) -> Signature:
    """(name, size, mtime_ns) of the slide's file and of every file of its data folder, sorted."""
    files = [path] if path.is_file() else []
    data_folder = path.with_suffix("") if path.is_file() else path
    if data_folder.is_dir():
        files += sorted(child for child in data_folder.rglob("*") if child.is_file())
    entries = []
    for file in files:
        try:
            stat = file.stat()
        except FileNotFoundError:
            continue
        entries.append((str(file), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


@dataclass
class _Seen:
    signature: Signature
    since: float
    handed_out: bool = False


class FolderWatcher:
    """`ready()` → the slides of `folder` that are complete and not yet handed out for their current signature."""

    def __init__(self, folder: Path, settle: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder = Path(folder)
        self.settle = float(settle)
        self.clock = clock
        self.seen: dict[Path, _Seen] = {}

    def slides(self) -> list[SlideInput]:
        """The slides in the folder now: slide files, and folders of DICOM files (one slide each)."""
        found = []
        for child in sorted(self.folder.iterdir()):
            if child.name.startswith("."):
                continue
            if is_slide_file(child):
                found.append(SlideInput(slide_id_of(child), child))
            elif child.is_dir():
                dicom = sorted(p for p in child.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
                if dicom:
                    found.append(SlideInput(child.name, dicom[0]))
        return found

    def ready(self) -> list[SlideInput]:
        now = self.clock()
        ready = []
        for slide in self.slides():
            key = slide.path.parent if slide.path.suffix.lower() == ".dcm" else slide.path
            signature = slide_signature(key)
            seen = self.seen.get(key)
            if seen is None or seen.signature != signature:
                self.seen[key] = _Seen(signature, now)
                continue
            if not seen.handed_out and now - seen.since >= self.settle:
                seen.handed_out = True
                ready.append(slide)
        return ready
