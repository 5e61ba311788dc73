"""A region as one vector: four neighbouring tiles embedded in one query, against the mean of their single-tile vectors.

The tiles are shipped held-out patches cut from the CC0 H&E slide (`pue/data/patches/heldout`, named by their
level-0 coordinates): two 2×2 blocks of 224 px tiles, side by side. For each block the script embeds the four tiles
as one row (`Embedder.embed_image_sets`) and one by one (`embed_images`), and prints as JSON, then as a table:

* how close the region vector is to the normalised mean of its tiles' vectors, and to each tile;
* the region vector of the same tiles in reverse order (the prompt keeps the order, so the vector may change);
* how the two regions compare with each other, as region vectors and as mean vectors.

Run: `python scripts/region_example.py BUNDLE [--json]` (any bundle of format 1.2; runtime only, no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pue.data import patch_set
from pue.runtime import Embedder

TILE = 224
REGIONS = {"region A": (768, 1344), "region B": (1216, 1344)}  # top-left corners of two 2×2 blocks


def region_tiles(corner: tuple[int, int]) -> list[Path]:
    """The four shipped tiles of the 2×2 block at `corner`, row by row (top-left, top-right, bottom-left, …)."""
    by_name = {path.name: path for path in patch_set("heldout")}
    x, y = corner
    names = [f"cmu_x{x + dx:05d}_y{y + dy:05d}.jpg" for dy in (0, TILE) for dx in (0, TILE)]
    missing = [name for name in names if name not in by_name]
    if missing:
        raise SystemExit(f"the shipped held-out patches lack {missing}: reinstall pue")
    return [by_name[name] for name in names]


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def measure(bundle: Path) -> dict:
    results: dict = {"bundle": str(bundle), "regions": {}}
    vectors = {}
    with Embedder.load(bundle) as embedder:
        results["tokens_per_image"] = embedder.manifest.tokens_per_image
        for name, corner in REGIONS.items():
            tiles = region_tiles(corner)
            region, reversed_region = embedder.embed_image_sets([tiles, tiles[::-1]])
            singles = embedder.embed_images(tiles)
            mean = unit(singles.mean(axis=0))
            vectors[name] = (region, mean)
            results["regions"][name] = {
                "tiles": [path.name for path in tiles],
                "cosine_region_vs_mean_of_tiles": float(region @ mean),
                "cosine_region_vs_each_tile": [float(region @ s) for s in singles],
                "cosine_mean_vs_each_tile": [float(mean @ s) for s in singles],
                "cosine_region_vs_reversed_order": float(region @ reversed_region),
            }
    (region_a, mean_a), (region_b, mean_b) = vectors.values()
    results["between_regions"] = {
        "cosine_region_vectors": float(region_a @ region_b),
        "cosine_mean_vectors": float(mean_a @ mean_b),
    }
    return results


def table(results: dict) -> str:
    lines = ["| | region A | region B |", "|---|---|---|"]
    a, b = results["regions"].values()

    def row(label: str, key: str) -> None:
        lines.append(f"| {label} | {a[key]:.4f} | {b[key]:.4f} |")

    row("cos(region vector, mean of the 4 tile vectors)", "cosine_region_vs_mean_of_tiles")
    lines.append(
        "| cos(region vector, each tile) min–max | "
        + " | ".join(
            f"{min(r['cosine_region_vs_each_tile']):.4f}–{max(r['cosine_region_vs_each_tile']):.4f}" for r in (a, b)
        )
        + " |"
    )
    lines.append(
        "| cos(mean vector, each tile) min–max | "
        + " | ".join(
            f"{min(r['cosine_mean_vs_each_tile']):.4f}–{max(r['cosine_mean_vs_each_tile']):.4f}" for r in (a, b)
        )
        + " |"
    )
    row("cos(region vector, same tiles in reverse order)", "cosine_region_vs_reversed_order")
    between = results["between_regions"]
    lines.append(
        f"| A vs B: region vectors {between['cosine_region_vectors']:.4f}, "
        f"mean vectors {between['cosine_mean_vectors']:.4f} | | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args(argv)
    results = measure(args.bundle)
    print(json.dumps(results, indent=2))
    if not args.json:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
