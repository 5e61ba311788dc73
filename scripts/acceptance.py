"""Full acceptance matrix: every tiny preset × architecture × exporter through `pue-export onnx` (parity gate),
then (unless --no-quantize) every precision through `pue-export quantize` on the torchscript bundles.

Each command runs in its own process under /usr/bin/time, so wall time and peak RSS are its own.
Prints a Markdown table and writes JSON (--out). Usage: python scripts/acceptance.py --workdir DIR [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

MATRIX = [
    (arch, preset)
    for arch in ("llava_next", "llava")
    for preset in ("ci", "e5v", "outliers", "bench")
    if not (arch == "llava" and preset == "e5v")
]
EXPORTERS = ("torchscript", "dynamo")
PRECISIONS = (("int8", "onnxruntime"), ("int8", "tensorrt"), ("int8-dynamic", "onnxruntime"), ("fp16", "onnxruntime"))


def timed(command: list[str]) -> dict:
    started = time.perf_counter()
    completed = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", completed.stderr)
    return {
        "command": " ".join(command),
        "rc": completed.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None,
        "tail": (completed.stdout + completed.stderr).strip().splitlines()[-3:] if completed.returncode else [],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("acceptance-out"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="skip the bench preset")
    parser.add_argument("--no-quantize", action="store_true")
    parser.add_argument("--arch", action="append", help="only these architectures (repeatable)")
    parser.add_argument("--preset", action="append", help="only these presets (repeatable)")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    export, rows = str(bin_dir / "pue-export"), []
    args.workdir.mkdir(parents=True, exist_ok=True)
    for arch, preset in MATRIX:
        if (args.quick and preset == "bench") or (args.arch and arch not in args.arch):
            continue
        if args.preset and preset not in args.preset:
            continue
        checkpoint = args.workdir / f"ckpt-{arch}-{preset}"
        build = timed([export, "tiny-model", str(checkpoint), "--arch", arch, "--preset", preset, "--overwrite"])
        for exporter in EXPORTERS:
            bundle = args.workdir / f"bundle-{arch}-{preset}-{exporter}"
            result = timed(
                [export, "onnx", str(checkpoint), "-o", str(bundle), "--exporter", exporter, "--overwrite", "--json"]
            )
            row = {
                "step": "onnx",
                "arch": arch,
                "preset": preset,
                "exporter": exporter,
                **result,
                "build_seconds": build["seconds"],
            }
            manifest = bundle / "manifest.json"
            if result["rc"] == 0 and manifest.exists():
                data = json.loads(manifest.read_text())
                checks = data["fidelity"]["parity_gate"]["checks"]
                row["min_cosine"] = min(c["value"] for c in checks if c["metric"] == "min cosine")
                row["max_abs"] = max(
                    c["value"]
                    for c in checks
                    if c["metric"] == "max abs diff" and c["name"] in ("images", "texts", "composed")
                )
                row["vision_max_abs"] = next(c["value"] for c in checks if c["name"] == "vision features")
                row["timings"] = data["export"].get("timings")
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.no_quantize:
            continue
        parent = args.workdir / f"bundle-{arch}-{preset}-torchscript"
        for precision, target in PRECISIONS:
            out = args.workdir / f"bundle-{arch}-{preset}-{precision}-{target}"
            result = timed(
                [
                    export,
                    "quantize",
                    str(parent),
                    "-o",
                    str(out),
                    "--precision",
                    precision,
                    "--target",
                    target,
                    "--overwrite",
                    "--json",
                ]
            )
            row = {
                "step": "quantize",
                "arch": arch,
                "preset": preset,
                "precision": precision,
                "target": target,
                **result,
            }
            report = out / "fidelity.json"
            if result["rc"] == 0 and report.exists():
                data = json.loads(report.read_text())
                row.update(
                    mean_cosine=data["gate"]["overall"]["mean_cosine"],
                    min_cosine=data["gate"]["overall"]["min_cosine"],
                    top1=data["gate"]["overall"]["top1"],
                    int8_flop_share=data["int8_flop_share"],
                    float_ops=len(data["float_nodes"]),
                    smoothed_groups=len(data["smoothed"]),
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| step | arch | preset | exporter/precision | rc | s | peak RSS MB | min cos | max abs / top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        what = r.get("exporter") or f"{r.get('precision')} ({r.get('target')})"
        last = r.get("max_abs", r.get("top1"))
        print(
            f"| {r['step']} | {r['arch']} | {r['preset']} | {what} | {r['rc']} | {r['seconds']} | "
            f"{r['peak_rss_mb']} | {r.get('min_cosine', '-')} | {last if last is not None else '-'} |"
        )
    out = args.out or args.workdir / "acceptance.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    failed = [r for r in rows if r["rc"] != 0]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
