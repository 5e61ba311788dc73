"""Fidelity matrix: every trained-like outlier fixture x seed x INT8 mode x calibration set, judged on the shipped
held-out patches by `pue-export quantize`'s own fidelity gate (issue 13). `.ci/run` runs seed 0 with `--check`
(issue 14's acceptance: every fixture class, both architectures, every INT8 mode, both calibration sets).

    python scripts/fidelity_matrix.py --work /tmp/matrix [--seeds 0,1,2] [--archs llava_next,llava]
        [--fixtures gains-few,gains-all,massive,vit-highnorm] [--modes int8:onnxruntime,int8:tensorrt,int8-dynamic]
        [--gains 100]
        [--calibrations shipped,svs8] [--rotate off,on] [--methods on,off] [--no-fallback] [--json matrix.json]
        [--markdown matrix.md] [--recipe gme --tile-size 448] [--check]

`--check` exits 1 when a cell with the methods on fails its gate, keeps under 80 % of the weight-matmul FLOPs in
int8, or has no FP32 parent (the cells of `--methods off` are expected to fail and are not counted).

`--recipe`/`--tile-size` export every FP32 bundle with that recipe and tile size (GME's processor turns a 224 px tile
into 448, so its bundles take 448 px tiles); the row's fixture label says so (`ci+gme@448px`).

`--gains 20,100,1000`: the norm gains the `gains-*` fixtures are built with (`tiny-model --outlier-gain`; 100 is
the presets' default and keeps the old directory names). A mode `fp16` measures how much the fixture amplifies
rounding alone (issue 14's conditioning table); a mode `floor` runs `pue-export floor` on each FP32 parent (once,
whatever the calibration sets): the parent in bf16 arithmetic on the gate, before any quantization.

Where a gate fails, `pue-export quantize` also measures the parent in bf16 arithmetic on the same items (its rounding
floor, `pue.calibration.rounding_floor`): the `bf16 floor` column, and the summary under the table counts the failed
cells whose fixture fails its own gate that way apart from those whose fixture passes it.

`--methods off` quantizes with issue 14's methods switched off (`--no-smooth --no-per-token --no-error-ranges
--no-gptq --no-split-channels --no-wide-weights --no-fallback --no-bias-correction`: everything int8, per tensor,
MinMax ranges), to show they are what makes a fixture pass.

Calibration sets: `shipped` (the 64-patch default) and `svs8`: 8 tissue tiles cut from
`../shared/data/cmu_small_region.svs` at its native resolution, chosen spatially disjoint from the shipped held-out
patches of the same slide (checked by level-0 rectangles against `pue/data/patches/index.json`). Each quantize runs
as its own `pue-export quantize` process: wall time and that process's peak RSS (os.wait4) are recorded; a failed
gate (exit 3) is read from `OUT.gate-failed.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "data" / "cmu_small_region.svs"
MODES = (("int8", "onnxruntime"), ("int8", "tensorrt"), ("int8-dynamic", "onnxruntime"))


def pue_export(*args: str) -> tuple[int, float, float]:
    """Run `pue-export ARGS` as a child process: (exit code, seconds, peak RSS in MB of that child)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "pue.cli.export_app", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024


def heldout_rectangles() -> list[tuple[int, int, int, int]]:
    index = json.loads((ROOT / "pue" / "data" / "patches" / "index.json").read_text())
    return [
        (p["x"], p["y"], p["x"] + p["size"], p["y"] + p["size"])
        for p in index["patches"]
        if p["set"] == "heldout" and p["source"] == SLIDE.name
    ]


def overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def svs_calibration(folder: Path, count: int = 8, seed: int = 0) -> list[dict]:
    """`count` tissue tiles of the slide, none overlapping a held-out patch; written as PNGs into `folder`."""
    import numpy as np

    from pue.calibration.slide_source import SlideSource

    folder.mkdir(parents=True, exist_ok=True)
    source = SlideSource(SLIDE, patch_size=224)
    heldout = heldout_rectangles()
    candidates = [
        p
        for p in source.candidates()
        if not any(overlaps((p.x, p.y, p.x + p.extent, p.y + p.extent), h) for h in heldout)
    ]
    if len(candidates) < count:
        raise SystemExit(f"only {len(candidates)} tissue tiles of {SLIDE.name} avoid the held-out patches")
    chosen = sorted(np.random.default_rng(seed).choice(len(candidates), size=count, replace=False))
    records = []
    for number in chosen:
        patch = candidates[int(number)]
        name = f"svs_x{patch.x:05d}_y{patch.y:05d}.png"
        patch.load().save(folder / name)
        records.append({"file": name, "x": patch.x, "y": patch.y, "size": patch.extent})
    return records


def gate_row(out: Path, code: int) -> dict:
    report_path = out / "fidelity.json" if code == 0 else Path(str(out) + ".gate-failed.json")
    if not report_path.is_file():
        return {"passed": False, "error": f"exit {code}, no report"}
    report = json.loads(report_path.read_text())
    overall = report["gate"]["overall"]
    return {
        "passed": bool(report["gate"]["passed"]),
        "mean_cosine": overall["mean_cosine"],
        "min_cosine": overall["min_cosine"],
        "top1": overall["top1"],
        "top1_strict": overall.get("top1_strict"),  # near-duplicate swaps counted too (`pue.fidelity`)
        "int8_flop_share": report.get("int8_flop_share"),
        "float_nodes": len(report.get("float_nodes", [])),
        "smoothed_groups": len(report.get("smoothed", [])),
        "per_token": len(report.get("per_token_nodes", [])),
        "ranges": (report.get("ranges") or {}).get("rule", "-"),
        # of the float ops, those kept float because the target backend computes them differently (`target_parity`)
        "target_float": len((report.get("target_parity") or {}).get("float_nodes", [])),
        # a failed INT8 gate measures the parent in bf16 arithmetic on the same items (`rounding_floor`): whether the
        # fixture itself passes where the quantizer did not
        "floor_passed": (report.get("rounding_floor") or {}).get("passed"),
        "floor_verdict": (report.get("rounding_floor") or {}).get("verdict"),
        "floor_min_cosine": ((report.get("rounding_floor") or {}).get("overall") or {}).get("min_cosine"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--archs", default="llava_next,llava")
    parser.add_argument("--fixtures", default="gains-few,gains-all,massive,vit-highnorm")
    parser.add_argument("--modes", default=",".join(f"{p}:{t}" for p, t in MODES), help="precision:target list")
    parser.add_argument("--gains", default="100", help="norm gains of the gains-* fixtures, e.g. 20,100,1000")
    parser.add_argument("--calibrations", default="shipped,svs8")
    parser.add_argument("--rotate", default="off", help="`pue-export quantize --rotate` values to run, e.g. off,on")
    parser.add_argument("--methods", default="on", help="on,off: issue 14's methods on, or all switched off")
    parser.add_argument("--no-fallback", action="store_true", help="one attempt per run: everything int8")
    parser.add_argument("--recipe", help="`pue-export onnx --recipe` of every FP32 bundle (e.g. gme)")
    parser.add_argument("--tile-size", type=int, help="`pue-export onnx --tile-size` (e.g. 448 for GME's processor)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if a cell with the methods on falls short")
    args = parser.parse_args()
    work = args.work
    svs_folder = work / "svs8"
    svs_tiles: list[dict] = []
    if "svs8" in args.calibrations.split(","):  # cutting the tiles needs the slides extra (openslide)
        svs_tiles = (
            svs_calibration(svs_folder) if not svs_folder.is_dir() else json.loads((work / "svs8.json").read_text())
        )
        (work / "svs8.json").write_text(json.dumps(svs_tiles, indent=2) + "\n")
    rows = []
    for arch in args.archs.split(","):
        for fixture, gain in fixtures_and_gains(args):
            for seed in (int(s) for s in args.seeds.split(",")):
                built = fixture if gain in (None, 100) else f"{fixture}@{gain}"
                label = built + (f"+{args.recipe}" if args.recipe else "")
                label += f"@{args.tile_size}px" if args.tile_size else ""
                model = work / f"{arch}-{built}-{seed}"
                fp32 = work / f"{arch}-{label}-{seed}-fp32"
                if not fp32.is_dir():
                    pue_export(
                        "tiny-model",
                        str(model),
                        "--arch",
                        arch,
                        "--preset",
                        fixture,
                        "--seed",
                        str(seed),
                        "--overwrite",
                        *(["--outlier-gain", str(gain)] if gain is not None else []),
                    )
                    recipe = ["--recipe", args.recipe] if args.recipe else []
                    recipe += ["--tile-size", str(args.tile_size)] if args.tile_size else []
                    pue_export("onnx", str(model), "-o", str(fp32), "--overwrite", *recipe)
                if not fp32.is_dir():  # the export's parity gate failed: the fixture is chaotic even in fp32
                    rows.append({"arch": arch, "fixture": label, "seed": seed, "no_parent": str(fp32)})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                for precision, target, calib, rotate, methods in runs(args):
                    if precision == "floor":
                        rows.append({"arch": arch, "fixture": label, "seed": seed, **floor_row(fp32)})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    out = work / f"{fp32.name}-{precision}-{target}-{calib}-rotate-{rotate}-methods-{methods}"
                    extra = ["--calib", str(svs_folder), "--num-patches", "8"] if calib == "svs8" else []
                    extra += ["--rotate", rotate] + (["--no-fallback"] if args.no_fallback else [])
                    if methods == "off":
                        extra += ["--no-smooth", "--no-per-token", "--no-error-ranges", "--no-gptq"]
                        extra += ["--no-split-channels", "--no-wide-weights", "--no-fallback", "--no-bias-correction"]
                    target_args = [] if precision == "fp16" else ["--target", target]
                    code, seconds, peak_mb = pue_export(
                        "quantize",
                        str(fp32),
                        "-o",
                        str(out),
                        "--precision",
                        precision,
                        *target_args,
                        "--overwrite",
                        *extra,
                    )
                    row = {
                        "arch": arch,
                        "fixture": label,
                        "seed": seed,
                        "precision": precision,
                        "target": target,
                        "calibration": calib,
                        "rotate": rotate,
                        "methods": methods,
                        "exit": code,
                        "seconds": round(seconds, 1),
                        "peak_mb": round(peak_mb),
                        **gate_row(out, code),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {"svs8_tiles": svs_tiles, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    if args.check:
        short = shortfalls(rows)
        for line in short:
            print(f"short of issue 14's acceptance: {line}", file=sys.stderr)
        if short:
            raise SystemExit(1)


def shortfalls(rows: list[dict]) -> list[str]:
    """The cells `--check` refuses: methods on, and a failed gate, under 80 % int8 FLOPs, or no FP32 parent."""
    short = []
    for r in rows:
        cell = f"{r['arch']} {r['fixture']} seed {r['seed']}"
        if "no_parent" in r:
            short.append(f"{cell}: no FP32 parent (its export failed the parity gate)")
            continue
        if r.get("methods", "on") != "on" or r.get("precision") == "floor":
            continue
        cell += f" {r['precision']} ({r['target']}, {r['calibration']} calibration)"
        if not r.get("passed"):
            short.append(f"{cell}: gate FAIL (min cosine {r.get('min_cosine')}, exit {r.get('exit')})")
        share = r.get("int8_flop_share")
        if r["precision"].startswith("int8") and (share is None or share < 0.8):
            short.append(f"{cell}: {share} of the weight-matmul FLOPs in int8, under 0.8")
    return short


def fixtures_and_gains(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """(fixture, norm gain) pairs: every `--gains` value for the gains-* fixtures, None for the others."""
    gains = [int(g) for g in args.gains.split(",")]
    return [
        (fixture, gain)
        for fixture in args.fixtures.split(",")
        for gain in (gains if fixture.startswith("gains-") else [None])
    ]


def runs(args: argparse.Namespace) -> list[tuple[str, str, str, str, str]]:
    """(precision, target, calibration set, --rotate, methods) for every quantize of one fixture and seed; the
    `floor` mode once (it quantizes nothing)."""
    modes = [(m.split(":") + ["onnxruntime"])[:2] for m in args.modes.split(",")]
    calibs, rotates, methods_ = args.calibrations.split(","), args.rotate.split(","), args.methods.split(",")
    return [
        (precision, target, calib, rotate, methods)
        for precision, target in modes
        for calib in (calibs[:1] if precision == "floor" else calibs)
        for rotate in (rotates[:1] if precision == "floor" else rotates)
        for methods in (methods_[:1] if precision == "floor" else methods_)
    ]


def floor_row(fp32: Path) -> dict:
    """`pue-export floor FP32 --json` as a row of the matrix (its verdict in the `bf16 floor` column)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pue.cli.export_app", "floor", str(fp32), "--json"], capture_output=True, text=True
    )
    seconds = round(time.perf_counter() - started, 1)
    row = {"precision": "floor", "target": "-", "calibration": "-", "rotate": "-", "methods": "-", "peak_mb": "-"}
    if done.returncode != 0:
        return {**row, "exit": done.returncode, "seconds": seconds, "passed": False, "error": done.stderr[-300:]}
    record = json.loads(done.stdout)
    overall = record["overall"]
    return {
        **row,
        "exit": 0,
        "seconds": seconds,
        "passed": bool(record["passed"]),
        "mean_cosine": overall["mean_cosine"],
        "min_cosine": overall["min_cosine"],
        "top1": overall["top1"],
        "floor_passed": bool(record["passed"]),
        "floor_verdict": record["verdict"],
        "floor_min_cosine": overall["min_cosine"],
    }


def markdown(rows: list[dict]) -> str:
    def fmt(value: object, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [
        "| arch | fixture | seed | mode | calibration | methods | gate | mean cos | min cos | top-1 | int8 FLOPs "
        "| float ops | per token | smoothed | ranges | bf16 floor | s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "no_parent" in r:
            lines.append(
                f"| {r['arch']} | {r['fixture']} | {r['seed']} | no FP32 parent: its export failed the parity gate |"
            )
            continue
        mode = r["precision"] + ("" if r["precision"] in ("int8-dynamic", "fp16", "floor") else f" ({r['target']})")
        lines.append(
            f"| {r['arch']} | {r['fixture']} | {r['seed']} | {mode} | {r['calibration']} | {r.get('methods', 'on')} | "
            f"{'pass' if r.get('passed') else 'FAIL'} | {fmt(r.get('mean_cosine'))} | {fmt(r.get('min_cosine'))} | "
            f"{fmt(r.get('top1'), 3)} | {fmt(r.get('int8_flop_share'), 2)} | {fmt(r.get('float_nodes'))} | "
            f"{fmt(r.get('per_token'))} | {fmt(r.get('smoothed_groups'))} | {r.get('ranges', '-')} | {floor(r)} | "
            f"{r['seconds']} | {r['peak_mb']} |"
        )
    return "\n".join(lines) + "\n" + summary(rows)


def floor(row: dict) -> str:
    """The parent's bf16 floor, measured where the gate failed: `pass` / `FAIL min` / `-` (not measured)."""
    if row.get("floor_passed") is None:
        return "-"
    if row.get("floor_verdict") == "tight":
        return f"pass, tight {row['floor_min_cosine']:.4f}"
    return "pass" if row["floor_passed"] else f"FAIL {row['floor_min_cosine']:.4f}"


def summary(rows: list[dict]) -> str:
    """Passes, and the failures split by the parent's bf16 floor: a cell whose parent fails its own gate in bf16
    arithmetic measures the fixture's conditioning, not the quantizer (`pue.calibration.rounding_floor`)."""
    orphans = [r for r in rows if "no_parent" in r]
    floors = [r.get("floor_verdict") or "error" for r in rows if r.get("precision") == "floor"]
    rows = [r for r in rows if "no_parent" not in r and r.get("precision") != "floor"]
    failed = [r for r in rows if not r.get("passed")]
    own = [r for r in failed if r.get("floor_passed") is False]
    tight = [r for r in failed if r.get("floor_verdict") == "tight"]
    unknown = [r for r in failed if r.get("floor_passed") is None]
    clear = len(failed) - len(own) - len(tight) - len(unknown)
    cells = (
        f"\n{len(rows) - len(failed)} of {len(rows)} cells pass; of the {len(failed)} that fail, {len(own)} have a "
        f"parent that fails the same gate in bf16 arithmetic, {len(tight)} one that passes it only just, {clear} one "
        "that passes it clearly"
        + (f", {len(unknown)} no floor measured" if unknown else "")
        + (f"; {len(orphans)} fixture(s) without an FP32 parent (the export's parity gate failed)" if orphans else "")
        + ".\n"
    )
    if not floors:
        return cells
    parents = (
        f"Parents' floors (`pue-export floor`): {floors.count('clear')} clear, {floors.count('tight')} tight, "
        f"{floors.count('fails')} fail"
        + (f", {floors.count('error')} not measured" if "error" in floors else "")
        + ".\n"
    )
    return (cells if rows or orphans else "\n") + parents


if __name__ == "__main__":
    main()
