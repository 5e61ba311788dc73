"""What `pue-embed search` does once its options are parsed: find the slide's features made with this bundle, embed
the query with it, score every tile, draw the heatmap and the contact sheet, print the result. Imported inside the
command (it loads the runtime)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pue.cli.common import console, print_json
from pue.errors import EXIT_OK, OutputExistsError, PueError

__all__ = ["SearchOptions", "embed_query", "run_search"]


@dataclass(frozen=True)
class SearchOptions:
    out: Path
    slide: str
    bundle: Path
    text: str | None = None
    image: Path | None = None
    top_k: int = 16
    tiling: str | None = None
    name: str | None = None
    slide_file: Path | None = None
    report: Path | None = None
    max_side: int = 1024
    overwrite: bool = False
    device: str = "cpu"
    backend: str = "auto"
    threads: int | None = None


def run_search(options: SearchOptions, json_output: bool = False) -> int:
    from pue.bundle import manifest_sha256, read_manifest
    from pue.embed.search import find_features, find_slide_file, score_tiles
    from pue.embed.search_pictures import contact_sheet, heatmap
    from pue.embed.writers import atomic_output
    from pue.extras import require_extras
    from pue.slides.readers import open_slide

    require_extras(["slides"], "pue-embed search", only={"slides": ("openslide", "h5py")})
    if options.image is not None and not options.image.is_file():
        raise PueError(f"--image {options.image} not found", hint="pass a tile image (png, jpg, tif)")
    read_manifest(options.bundle)  # a clear error for a path that is not a bundle
    bundle_sha256 = manifest_sha256(options.bundle)
    features = find_features(options.out, options.slide, bundle_sha256, options.tiling, options.name)
    slide_path = find_slide_file(options.out, features, options.slide_file)
    pictures = _picture_paths(options, features.path)
    taken = [path for path in pictures.values() if path.exists()]
    if taken and not options.overwrite:
        raise OutputExistsError(str(taken[0]))

    query = embed_query(options)
    hits = score_tiles(features.features, query, options.top_k)
    extent = int(features.coords_attrs["patch_size_level0"])
    patch_size = int(features.coords_attrs["patch_size"])
    label = _label(options)
    reader = open_slide(slide_path)
    try:
        drawn = {
            "heatmap": heatmap(reader, features.coords, extent, hits, label, options.max_side),
            "contact_sheet": contact_sheet(reader, features.coords, extent, patch_size, hits),
        }
    finally:
        reader.close()
    pictures["heatmap"].parent.mkdir(parents=True, exist_ok=True)
    for key, image in drawn.items():
        with atomic_output(pictures[key]) as temporary:
            image.save(temporary, format="PNG")

    result = {
        "slide_id": options.slide,
        "features": str(features.path),
        "slide_file": str(slide_path),
        "bundle_sha256": bundle_sha256,
        "query": {
            "text": options.text,
            "image": None if options.image is None else str(options.image),
            "kind": _kind(options),
        },  # fmt: skip
        "tiles": int(hits.scores.size),
        "score_min": round(float(hits.scores.min()), 6) if hits.scores.size else None,
        "score_max": round(float(hits.scores.max()), 6) if hits.scores.size else None,
        "top": hits.rows(features.coords),
        "heatmap": str(pictures["heatmap"]),
        "contact_sheet": str(pictures["contact_sheet"]),
        "scores": [round(float(score), 6) for score in hits.scores],  # in the features file's row order
    }
    _print(result, json_output)
    return EXIT_OK


def embed_query(options: SearchOptions) -> Any:
    """The query's unit vector, from the bundle: text, tile, or tile + text (composed)."""
    from pue.runtime import Embedder

    with Embedder.load(options.bundle, backend=options.backend, device=options.device, threads=options.threads) as emb:
        if options.image is not None and options.text is not None:
            return emb.embed_composed([options.image], [options.text])[0]
        if options.image is not None:
            return emb.embed_images([options.image])[0]
        return emb.embed_texts([options.text or ""])[0]


def _kind(options: SearchOptions) -> str:
    if options.image is not None:
        return "composed" if options.text is not None else "image"
    return "text"


def _label(options: SearchOptions) -> str:
    parts = [] if options.image is None else [f"[{options.image.name}]"]
    return " + ".join(parts + ([repr(options.text)] if options.text is not None else []))


def _picture_paths(options: SearchOptions, features_path: Path) -> dict[str, Path]:
    """`<report>/<slide>.<query slug>-<hash>.heatmap.png` and `.top<k>.png`; the hash tells queries apart."""
    folder = options.report or features_path.parent.parent / features_path.parent.name.replace("features_", "search_")
    image_bytes = None if options.image is None else options.image.read_bytes()
    identity = hashlib.sha256(repr((options.text, image_bytes)).encode())
    words = options.text or (options.image.stem if options.image is not None else "")
    slug = re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-")
    stem = f"{options.slide}.{slug[:40] or 'query'}-{identity.hexdigest()[:8]}"
    return {
        "heatmap": folder / f"{stem}.heatmap.png",
        "contact_sheet": folder / f"{stem}.top{options.top_k}.png",
    }


def _print(result: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(result)
        return
    out = console(stderr=False)
    out.print(f"{result['tiles']} tiles of {result['slide_id']} scored against {_kind_text(result)}")
    for row in result["top"][:5]:
        out.print(f"  #{row['rank']}  {row['score']:.4f}  x={row['x']} y={row['y']}")
    out.print(f"heatmap {result['heatmap']}\ncontact sheet {result['contact_sheet']}")


def _kind_text(result: dict[str, Any]) -> str:
    query = result["query"]
    return " + ".join(str(value) for value in (query["image"], query["text"]) if value is not None)
