"""The slide job's two engines on the same slides, bundle, batch size and threads: tiles/s over the whole run.

    python scripts/bench_slide_engines.py BUNDLE [--slide PATH ...] [--mag 20] [--batch-size 4] [--threads 1]
        [--rounds 2] [--ray-address ADDR] [--json engines.json]

Runs, one after the other (never sharing the CPU), `pue-embed slides ... --engine local` and `--engine ray` into
fresh folders, `--rounds` times each, and keeps each engine's best round. The figure compared is `wall_tiles_per_s`
(tiles over the run from its record's creation to its end: the local engine's bundle load is before it, the Ray
engine's start-up — a local Ray, or joining `--ray-address` — inside it); the per-slide `tiles_per_s` is printed
too, but Ray's slides overlap, so it understates Ray. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slides import SHARED_SLIDE, cpu_name, slide_job  # noqa: E402


def run_engine(engine: str, bundle: Path, slides: list[Path], args: argparse.Namespace) -> dict:
    address = args.ray_address if engine == "ray" else None
    return slide_job(bundle, slides, args.batch_size, args.threads, args.mag, engine=engine, ray_address=address)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--slide", type=Path, action="append", help="Slides (default: the shared CMU SVS).")
    parser.add_argument("--mag", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="Intra-op threads (per Ray actor).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ray-address", default=None, help="A running Ray cluster (default: a local Ray per run).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = parser.parse_args()
    slides = args.slide or [SHARED_SLIDE]
    rounds: dict[str, list[dict]] = {"local": [], "ray": []}
    for _ in range(args.rounds):
        for engine in rounds:
            rounds[engine].append(run_engine(engine, args.bundle, slides, args))
    rows = []
    for engine, runs in rounds.items():
        best = max(runs, key=lambda run: run["wall_tiles_per_s"] or 0.0)
        rows.append({"engine": engine, "tiles": best["tiles"], "wall_seconds": best["wall_seconds"],
                     "wall_tiles_per_s": best["wall_tiles_per_s"], "per_slide_tiles_per_s": best["tiles_per_s"],
                     "process_seconds": best["process_seconds"],
                     "rounds_wall_tiles_per_s": [run["wall_tiles_per_s"] for run in runs]})  # fmt: skip
    result = {"bundle": str(args.bundle), "slides": [str(s) for s in slides], "magnification": args.mag,
              "batch_size": args.batch_size, "threads": args.threads, "ray_address": args.ray_address,
              "cpu": cpu_name(), "cores": os.cpu_count(), "engines": rows}  # fmt: skip
    print(json.dumps(result, indent=2))
    print()
    print("| engine | tiles | wall s | wall tiles/s | per-slide tiles/s | process s | rounds (wall tiles/s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row[key] for key in ("engine", "tiles", "wall_seconds", "wall_tiles_per_s", "per_slide_tiles_per_s",
                                      "process_seconds", "rounds_wall_tiles_per_s")]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
