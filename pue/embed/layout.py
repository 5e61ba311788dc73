"""Where the slide job writes, in TRIDENT's folder layout.

```
OUT/<tiling>/features_<name>/<slide_id>.h5      one file per slide (or .parquet with --format parquet)
OUT/<tiling>/features_<name>/.locks/<slide_id>.lock
OUT/runs/<UTC time>-<host>-<pid>.json           one run record per process
```

`<tiling>` is TRIDENT's `20x_224px_0px_overlap` for `--mag 20 --patch-size 224 --overlap 0`; a `--mpp 0.5` run
writes `0.5mpp_224px_0px_overlap` (TRIDENT has no µm/px folders). `<name>` is `--name` or the bundle's folder name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pue.slides.resolution import Resolution

__all__ = ["OutputLayout"]


@dataclass(frozen=True)
class OutputLayout:
    root: Path
    resolution: Resolution
    patch_size: int
    overlap: int
    name: str
    fmt: str = "h5"

    @property
    def tiling(self) -> str:
        if self.resolution.mpp is not None:
            target = f"{self.resolution.mpp:g}mpp"
        elif self.resolution.magnification is not None:
            target = f"{self.resolution.magnification:g}x"
        else:
            target = "native"
        return f"{target}_{self.patch_size}px_{self.overlap}px_overlap"

    @property
    def features_dir(self) -> Path:
        return self.root / self.tiling / f"features_{self.name}"

    @property
    def locks_dir(self) -> Path:
        return self.features_dir / ".locks"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def output(self, slide_id: str) -> Path:
        return self.features_dir / f"{slide_id}.{self.fmt}"

    def lock(self, slide_id: str) -> Path:
        return self.locks_dir / f"{slide_id}.lock"

    def thumbnail(self, slide_id: str) -> Path:
        return self.root / self.tiling / "thumbnails" / f"{slide_id}.png"

    def make(self) -> None:
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
