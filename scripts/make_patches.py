"""Cut the sample pathology patches shipped in ``pue/data/patches`` from the two source images.

Three sets, cut from disjoint rectangles of each source so that nothing measured on ``heldout`` or
``background`` was seen during INT8 calibration:

* ``calibration``: overlapping tissue crops from the top of the H&E slide and the top of the IHC image;
* ``heldout``: non-overlapping tissue tiles from the bottom of both;
* ``background``: a few glass tiles from the left margin of the slide (for "is this empty?" checks).

Deterministic: the same sources give the same files (regions, strides and the filter are constants here).
Run from anywhere: ``python scripts/make_patches.py [--source-dir DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PATCH = 224
LEVEL = 0
# The highest quality that keeps the whole folder under 4 MB (~3.4 MB at 88; 90 would be ~3.6 MB of data but
# ~4.1 MB on disk), with no visible loss at 224 px.
JPEG_QUALITY = 88
SETS = ("calibration", "heldout", "background")

# Tissue filter. Saturation is measured on 8x8-pixel block means (a 1/8 thumbnail, as slide tissue masks
# usually are) so pale stroma between nuclei counts as tissue rather than as a sprinkle of glass pixels.
BLOCK = 8
# Otsu on a slide's saturation splits glass from stain and adapts down for faint stains; it is capped
# because on an image that is nearly all tissue (the IHC crop) it splits DAB from hematoxylin instead,
# and on H&E it lands high enough (~50) to drop pale eosin.
SAT_CAP = 15.0
WHITE_LEVEL = 220  # a pixel is "white" (glass, lumen) when all three channels reach this
MIN_TISSUE = 0.5  # tissue patches: at least this fraction of blocks above the threshold ...
MAX_WHITE = 0.45  # ... and at most this fraction of white pixels
MAX_BACKGROUND_TISSUE = 0.05  # background patches: at most this fraction of tissue blocks
MIN_BACKGROUND_WHITE = 0.9  # ... and at least this fraction of white pixels
N_BACKGROUND = 6
PACK_STEP = 32  # scan step when packing held-out tiles

Region = tuple[int, int, int, int]  # (x0, y0, x1, y1), half-open; patches lie wholly inside


@dataclass(frozen=True)
class Source:
    file: str
    prefix: str
    stain: str
    mpp: float | None
    calibration: Region
    calibration_stride: int
    heldout: Region
    background: Region | None


SOURCES = (
    # 2220 x 2967 px. Tissue runs top to bottom in x ~500-1900; the left margin is glass apart from a thin
    # strand at y ~1000-1160 (the filter drops it). The 112-px band y 1456-1568 is left unused as a gap.
    Source(
        file="cmu_small_region.svs",
        prefix="cmu",
        stain="H&E",
        mpp=0.499,
        calibration=(448, 0, 2220, 1120),
        calibration_stride=48,
        heldout=(448, 1120, 2220, 2967),
        background=(0, 0, 448, 2967),
    ),
    # 512 x 512 px, tissue everywhere (glands, stroma, one lumen): the top 288 rows calibrate, the bottom
    # 224 rows hold two non-overlapping tiles.
    Source(
        file="ihc.png",
        prefix="ihc",
        stain="IHC",
        mpp=None,
        calibration=(0, 0, 512, 288),
        calibration_stride=32,
        heldout=(0, 288, 512, 512),
        background=None,
    ),
)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on a 0-255 scale (same as Pillow's HSV mode), from an (..., 3) RGB array."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0) * 255.0, 0.0)


def block_saturation(rgb: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Saturation of block x block means (partial edge blocks are dropped)."""
    h, w = rgb.shape[0] // block * block, rgb.shape[1] // block * block
    means = rgb[:h, :w].astype(np.float32).reshape(h // block, block, w // block, block, 3).mean(axis=(1, 3))
    return saturation(means)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 256) over a 256-bin histogram: maximises between-class variance."""
    hist = np.histogram(values, bins=256, range=(0, 256))[0].astype(np.float64)
    p = hist / hist.sum()
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * w0 - mu) ** 2 / np.maximum(w0 * (1.0 - w0), 1e-12)
    return float(np.argmax(between))


def tissue_threshold(rgb: np.ndarray) -> tuple[float, float]:
    """(Otsu threshold of the whole image's block saturation, the capped threshold actually applied)."""
    otsu = otsu_threshold(block_saturation(rgb))
    return otsu, min(otsu, SAT_CAP)


def measure(patch: np.ndarray, threshold: float) -> tuple[float, float]:
    """(tissue fraction, white fraction) of one RGB patch."""
    tissue = float((block_saturation(patch) > threshold).mean())
    white = float((patch >= WHITE_LEVEL).all(axis=-1).mean())
    return tissue, white


def grid(region: Region, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the PATCH x PATCH squares at this stride that fit wholly inside region, row-major."""
    x0, y0, x1, y1 = region
    return [(x, y) for y in range(y0, y1 - PATCH + 1, stride) for x in range(x0, x1 - PATCH + 1, stride)]


def intersects(a: Region, b: Region) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def pack(entries: list[dict]) -> list[dict]:
    """Greedily keep, in scan order, the entries whose square overlaps no square already kept."""
    kept: list[dict] = []
    for e in entries:
        square = (e["x"], e["y"], e["x"] + PATCH, e["y"] + PATCH)
        if not any(intersects(square, (k["x"], k["y"], k["x"] + PATCH, k["y"] + PATCH)) for k in kept):
            kept.append(e)
    return kept


def evenly(items: list, n: int) -> list:
    """n items spread evenly over the list (all of them if there are no more than n)."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def cut_source(src: Source, source_dir: Path, out: Path) -> tuple[list[dict], dict]:
    # Disjoint regions are what keeps heldout/background out of calibration; check rather than trust.
    for other in (src.heldout, src.background):
        if other is not None and intersects(src.calibration, other):
            raise SystemExit(f"{src.file}: region {other} overlaps the calibration region {src.calibration}")
    with Image.open(source_dir / src.file) as im:
        rgb = np.asarray(im.convert("RGB"))  # level 0 of the SVS; the PNG as is
    otsu, threshold = tissue_threshold(rgb)

    def keep(set_name: str, corners: list[tuple[int, int]], kind: str) -> list[dict]:
        entries = []
        for x, y in corners:
            patch = rgb[y : y + PATCH, x : x + PATCH]
            tissue, white = measure(patch, threshold)
            if kind == "tissue" and not (tissue >= MIN_TISSUE and white <= MAX_WHITE):
                continue
            if kind == "background" and not (tissue <= MAX_BACKGROUND_TISSUE and white >= MIN_BACKGROUND_WHITE):
                continue
            rel = f"{set_name}/{src.prefix}_x{x:05d}_y{y:05d}.jpg"
            entries.append(
                {
                    "file": rel,
                    "set": set_name,
                    "source": src.file,
                    "x": x,
                    "y": y,
                    "size": PATCH,
                    "level": LEVEL,
                    "mpp": src.mpp,
                    "stain": src.stain,
                    "kind": kind,
                    "tissue_fraction": round(tissue, 4),
                }
            )
        return entries

    entries = keep("calibration", grid(src.calibration, src.calibration_stride), "tissue")
    # A fixed 224-px grid wastes the ragged tissue edge; scanning at fine steps and packing non-overlapping
    # tissue squares fits more held-out tiles into the same region.
    entries += pack(keep("heldout", grid(src.heldout, PACK_STEP), "tissue"))
    if src.background is not None:
        entries += evenly(keep("background", grid(src.background, PATCH), "background"), N_BACKGROUND)

    for e in entries:
        tile = Image.fromarray(np.ascontiguousarray(rgb[e["y"] : e["y"] + PATCH, e["x"] : e["x"] + PATCH]))
        tile.save(out / e["file"], "JPEG", quality=JPEG_QUALITY, optimize=True)

    info = {
        "stain": src.stain,
        "mpp": src.mpp,
        "regions": {
            "calibration": {"rect": list(src.calibration), "stride": src.calibration_stride},
            "heldout": {"rect": list(src.heldout), "packed_from_step": PACK_STEP},
            "background": None if src.background is None else {"rect": list(src.background), "stride": PATCH},
        },
        "saturation_otsu": otsu,
        "saturation_threshold": threshold,
    }
    return entries, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "pue" / "data" / "patches")
    args = parser.parse_args(argv)

    # Only the set folders and the index are ours to replace; PROVENANCE.md next to them is hand-written.
    for name in SETS:
        shutil.rmtree(args.out / name, ignore_errors=True)
        (args.out / name).mkdir(parents=True)

    patches: list[dict] = []
    sources: dict[str, dict] = {}
    for src in SOURCES:
        entries, info = cut_source(src, args.source_dir, args.out)
        patches += entries
        sources[src.file] = info
    patches.sort(key=lambda e: (SETS.index(e["set"]), e["file"]))

    counts = {name: sum(e["set"] == name for e in patches) for name in SETS}
    index = {
        "format": 1,
        "script": "scripts/make_patches.py",
        "command": "python scripts/make_patches.py --source-dir ../shared/data --out pue/data/patches",
        "patch_size": PATCH,
        "level": LEVEL,
        "jpeg_quality": JPEG_QUALITY,
        "sets": {
            "calibration": "overlapping tissue crops for INT8 calibration (top of each source)",
            "heldout": "non-overlapping tissue tiles never seen by calibration (bottom of each source)",
            "background": "glass tiles from the slide's left margin, outside the calibration region",
        },
        "counts": counts,
        "tissue_filter": {
            "measure": f"HSV saturation of {BLOCK}x{BLOCK}-pixel block means; tissue = blocks above threshold",
            "block": BLOCK,
            "threshold": f"min(Otsu over the whole source image, {SAT_CAP})",
            "saturation_cap": SAT_CAP,
            "white_level": WHITE_LEVEL,
            "min_tissue_fraction": MIN_TISSUE,
            "max_white_fraction": MAX_WHITE,
            "max_background_tissue_fraction": MAX_BACKGROUND_TISSUE,
            "min_background_white_fraction": MIN_BACKGROUND_WHITE,
        },
        "sources": sources,
        "patches": patches,
    }
    (args.out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(patches)} patches {counts} in {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
