"""Slide-job throughput against `pue-bench latency` on one bundle, at the same batch size and threads.

    python scripts/bench_slides.py BUNDLE [--slide PATH ...] [--mag 20] [--batch-size 8] [--threads N] [--rounds 2]
        [--json slides.json]

Runs, one after the other (never sharing the CPU): `pue-bench latency BUNDLE --batch-sizes B` (items/s of the
runtime on decoded patches), then `pue-embed slides SLIDE... --batch-size B` into a fresh folder (tiles/s of the
whole job per slide: open, tissue mask, reading, preprocessing, inference, writing; and the reader thread's own
tiles/s, which shows whether reading could keep up). Each is run `--rounds` times and its best round kept. Prints a
table and JSON; the ratio job / latency is the figure the issue asks to be at least 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmu_small_region.svs"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def latency_items_per_s(bundle: Path, batch: int, threads: int | None, iters: int) -> float:
    command = [_bin("pue-bench"), "latency", str(bundle), "--batch-sizes", str(batch), "--warmup", "2",
               "--iters", str(iters), "--no-peaks", "--json"]  # fmt: skip
    if threads:
        command += ["--threads", str(threads)]
    report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    rows = [row for row in report["results"] if row["backend"] != "pytorch" and row["batch_size"] == batch]
    return float(rows[0]["items_per_s"])


def slide_job(
    bundle: Path,
    slides: list[Path],
    batch: int,
    threads: int | None,
    mag: float,
    engine: str = "local",
    ray_address: str | None = None,
) -> dict:
    """One `pue-embed slides` run into a fresh folder: its --json summary, plus the whole process's seconds."""
    with tempfile.TemporaryDirectory(prefix=f"bench-slides-{engine}-") as out:
        command = [_bin("pue-embed"), "slides", *map(str, slides), "-o", out, "--bundle", str(bundle),
                   "--batch-size", str(batch), "--mag", f"{mag:g}", "--engine", engine, "--json"]  # fmt: skip
        if threads:
            command += ["--threads", str(threads)]
        if ray_address:
            command += ["--ray-address", ray_address]
        began = time.perf_counter()
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        summary = json.loads(completed.stdout[completed.stdout.index("{") :])
        summary["process_seconds"] = round(time.perf_counter() - began, 3)
        return summary


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--slide", type=Path, action="append", help="Slides (default: the shared CMU SVS).")
    parser.add_argument("--mag", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--iters", type=int, default=10, help="Timed batches of the latency run.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Also write the result here.")
    args = parser.parse_args()
    slides = args.slide or [SHARED_SLIDE]
    latency, jobs = [], []
    for _ in range(args.rounds):
        latency.append(latency_items_per_s(args.bundle, args.batch_size, args.threads, args.iters))
        jobs.append(slide_job(args.bundle, slides, args.batch_size, args.threads, args.mag))
    best_job = max(jobs, key=lambda job: job["tiles_per_s"] or 0.0)
    result = {
        "bundle": str(args.bundle),
        "slides": [str(slide) for slide in slides],
        "magnification": args.mag,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "latency_items_per_s": round(max(latency), 3),
        "latency_rounds": [round(value, 3) for value in latency],
        "job_tiles": best_job["tiles"],
        "job_tiles_per_s": best_job["tiles_per_s"],
        "job_rounds": [job["tiles_per_s"] for job in jobs],
        "reader_tiles_per_s": best_job["reader_tiles_per_s"],
        "ratio_job_to_latency": round(best_job["tiles_per_s"] / max(latency), 3),
    }
    print(json.dumps(result, indent=2))
    print()
    print("| bundle | batch | latency items/s | slide job tiles/s | job / latency | reader-only tiles/s |")
    print("|---|---|---|---|---|---|")
    print(f"| {Path(args.bundle).name} | {args.batch_size} | {result['latency_items_per_s']} | "
          f"{result['job_tiles_per_s']} ({result['job_tiles']} tiles) | {result['ratio_job_to_latency']} | "
          f"{result['reader_tiles_per_s']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
