"""Ask a slide in words (`pue-embed search`): score every embedded tile of a slide against a query.

The query is embedded with the bundle the slide's features were made with: a text through the recipe's text prompt,
a tile plus a text through its composed prompt ("like this, but with necrosis"), or a tile alone. The features file
records its bundle's manifest sha256; another bundle is refused, since vectors of two bundles do not compare. Every
tile's score is its cosine to the query (all vectors are unit length), and the top-k tiles are the highest scores,
ties broken by file order.

The slide file itself (for the heatmap's thumbnail and the contact sheet's tiles) is found through the run records
of the output folder (`OUT/runs/*.json`, newest first) and must still be the file that was embedded: the same name,
size and modification time as the features file records. `slide_file=` names it when it has moved; then its name
and size must match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pue.embed.writers import SlideFeatures, read_slide_file
from pue.errors import PueError

__all__ = ["SearchHits", "find_features", "find_slide_file", "score_tiles"]

FEATURE_SUFFIXES = (".h5", ".parquet")


@dataclass(frozen=True)
class SearchHits:
    """Every tile's cosine to the query, and the best `top_k` of them (indices into the features file's rows)."""

    scores: np.ndarray  # float32 (N,)
    top: np.ndarray  # int64 (k,), best first

    def rows(self, coords: np.ndarray) -> list[dict[str, Any]]:
        return [
            {"rank": rank + 1, "row": int(i), "x": int(coords[i, 0]), "y": int(coords[i, 1]),
             "score": round(float(self.scores[i]), 6)}
            for rank, i in enumerate(self.top)
        ]  # fmt: skip


def score_tiles(features: np.ndarray, query: np.ndarray, top_k: int) -> SearchHits:
    """Cosine of each row of `features` (unit vectors) to `query` (one unit vector) and the `top_k` best rows."""
    if top_k < 1:
        raise PueError(f"--top-k must be at least 1, got {top_k}")
    vector = np.asarray(query, np.float32).reshape(-1)
    if features.ndim != 2 or features.shape[1] != vector.shape[0]:
        raise PueError(
            f"the features have shape {features.shape}, the query vector has {vector.shape[0]} dimensions",
            hint="the features were made with another bundle",
        )
    scores = (features.astype(np.float32) @ vector).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    return SearchHits(scores=scores, top=order[:top_k].astype(np.int64))


def find_features(
    out: Path, slide_id: str, bundle_sha256: str, tiling: str | None = None, name: str | None = None
) -> SlideFeatures:
    """The features file of `slide_id` under `out` (TRIDENT layout) made with the bundle `bundle_sha256`."""
    if not out.is_dir():
        raise PueError(f"output folder not found: {out}", hint="pass the -o folder of pue-embed slides")
    pattern = f"{tiling or '*'}/features_{name or '*'}/{slide_id}"
    candidates = sorted(path for suffix in FEATURE_SUFFIXES for path in out.glob(pattern + suffix))
    if not candidates:
        raise PueError(
            f"no features of slide {slide_id} under {out} (looked for {pattern}.h5 and .parquet)",
            hint="embed the slide first with pue-embed slides, or check --slide, --tiling and --name",
        )
    files = [read_slide_file(path) for path in candidates]
    matching = [file for file in files if file.features_attrs.get("bundle_sha256") == bundle_sha256]
    if not matching:
        made_with = "; ".join(f"{f.path} by bundle {str(f.features_attrs.get('bundle_sha256'))[:12]}" for f in files)
        raise PueError(
            f"the features of slide {slide_id} were made with another bundle ({made_with}); the bundle given is "
            f"{bundle_sha256[:12]}",
            hint="pass the bundle the features were made with: vectors of two bundles do not compare",
        )
    if len(matching) > 1:
        raise PueError(
            f"slide {slide_id} has {len(matching)} features files made with this bundle: "
            + ", ".join(str(f.path.relative_to(out)) for f in matching),
            hint="choose one with --tiling (e.g. 20x_224px_0px_overlap) or --name",
        )
    return matching[0]


def find_slide_file(out: Path, features: SlideFeatures, slide_file: Path | None = None) -> Path:
    """The slide file the features were made from (module docstring), checked against what the features record."""
    source = features.job.get("source") or {}
    slide_id = features.job.get("slide_id", features.path.stem)
    if slide_file is not None:
        if not slide_file.is_file():
            raise PueError(f"--slide-file {slide_file} not found")
        size = slide_file.stat().st_size
        if source and (slide_file.name != source.get("name") or size != source.get("size")):
            raise PueError(
                f"--slide-file {slide_file} ({size} bytes) is not the slide the features of {slide_id} were made "
                f"from ({source.get('name')}, {source.get('size')} bytes)",
                hint="pass that slide, or re-embed this one with pue-embed slides",
            )
        return slide_file
    changed = []
    for record in sorted((out / "runs").glob("*.json"), reverse=True):
        try:
            slides = json.loads(record.read_text()).get("slides", [])
        except (OSError, ValueError):
            continue
        for entry in slides:
            path = Path(entry.get("path", ""))
            if entry.get("slide_id") != slide_id or path.name != source.get("name") or not path.is_file():
                continue
            stat = path.stat()
            if (stat.st_size, stat.st_mtime_ns) == (source.get("size"), source.get("mtime_ns")):
                return path
            changed.append(str(path))
    if changed:
        raise PueError(
            f"the slide file of {slide_id} changed since its features were made: {changed[0]}",
            hint="re-embed it with pue-embed slides (a rerun redoes a rescanned slide)",
        )
    raise PueError(
        f"the slide file of {slide_id} ({source.get('name')}) is not where the run records of {out} say",
        hint="pass it with --slide-file PATH",
    )
