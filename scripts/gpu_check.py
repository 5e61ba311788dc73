"""GPU check: build the `bench` tiny checkpoint, export its FP32 bundle, and compare every backend this machine has
for fidelity (gate metrics against the PyTorch fp32 reference) and latency (batch 1 and 8, held-out patches).

Run through scripts/gpu_check.sh on a GPU machine without network (PYTHONPATH=. from the source tree). Every
backend that is not run is listed with the reason. Results are written as JSON after every step (so a run cut
short keeps what it measured) to --out, default $OUT/gpu_check.json when $OUT is set.

    python scripts/gpu_check.py --device cpu --dry-run     # argument parsing and the table, no models
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gpu_check_report import Row, Run, table, write_json

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DTYPES = ("float32", "float16", "bfloat16")
PRECISION_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


# --- environment ---------------------------------------------------------------------------------------------


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def version_of(name: str) -> str | None:
    try:
        import importlib.metadata as metadata

        return metadata.version(name)
    except Exception:
        return None


def describe_environment(device: str, dry_run: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for package in (
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "tensorrt",
        "cuda-python",
        "typer",
        "tokenizers",
    ):
        env[package] = version_of(package)
    env["tensorrt_importable"] = has_module("tensorrt")
    env["cuda_python_importable"] = has_module("cuda.bindings") if has_module("cuda") else False
    if dry_run:
        return env
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = list(torch.cuda.get_device_capability(0))
    except Exception as exc:  # report, do not stop
        env["torch_error"] = repr(exc)
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as exc:
        env["onnxruntime_error"] = repr(exc)
    return env


def plan_rows(device: str, environment: dict[str, Any]) -> list[Row]:
    """Every comparison this check knows, with the reason when this machine cannot run it."""
    rows = [Row(f"pytorch-{PRECISION_NAMES[d]}", "pytorch", PRECISION_NAMES[d], device) for d in REFERENCE_DTYPES]
    if device == "cpu":
        rows[1].status, rows[1].reason = "not run", "fp16 reference is for CUDA (--device cpu)"
    rows.append(Row("onnxruntime-cpu-fp32", "onnxruntime", "fp32", "cpu"))
    providers = environment.get("onnxruntime_providers") or []
    ort_cuda = Row("onnxruntime-cuda-fp32", "onnxruntime", "fp32", device)
    ort_trt = Row("onnxruntime-tensorrt-ep-fp32", "onnxruntime+tensorrt-ep", "fp32", device)
    engines = Row("tensorrt-fp32", "tensorrt", "fp32", device)
    if device == "cpu":
        for row in (ort_cuda, ort_trt, engines):
            row.status, row.reason = "not run", "needs a CUDA GPU (--device cpu)"
    else:
        if "CUDAExecutionProvider" not in providers:
            ort_cuda.status = "not run"
            ort_cuda.reason = (
                f"onnxruntime has no CUDA provider (onnxruntime {environment.get('onnxruntime')}, "
                f"onnxruntime-gpu {environment.get('onnxruntime-gpu') or 'not installed'}; "
                f"providers {providers or 'unknown'})"
            )
        if "TensorrtExecutionProvider" not in providers:
            ort_trt.status, ort_trt.reason = "not run", "onnxruntime has no TensorRT provider"
        if not environment.get("tensorrt_importable"):
            engines.status, engines.reason = "not run", "tensorrt is not installed (cannot pip install here)"
        elif not environment.get("cuda_python_importable"):
            engines.status, engines.reason = "not run", "cuda-python (cuda.bindings) is not installed"
    rows += [ort_cuda, ort_trt, engines]
    return rows


# --- steps ---------------------------------------------------------------------------------------------------


def step(run: Run, name: str, action: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    record: dict[str, Any] = {"name": name}
    try:
        result = action()
        record.update(status="ran", detail=result if isinstance(result, str) else "")
        return result
    except Exception as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:])
        raise
    finally:
        record["seconds"] = round(time.perf_counter() - started, 1)
        run.steps.append(record)
        write_json(run)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep))
    return subprocess.run(
        [sys.executable, "-m", "pue.cli.export_app", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def heldout_patches() -> list[Path]:
    return sorted((ROOT / "pue" / "data" / "patches" / "heldout").glob("*.jpg"))


def make_checkpoint(workdir: Path) -> str:
    out = workdir / "checkpoint"
    if has_module("typer"):
        done = cli("tiny-model", str(out), "--preset", "bench", "--overwrite")
        if done.returncode == 0:
            return f"pue-export tiny-model {out} --preset bench"
        raise RuntimeError(f"pue-export tiny-model failed ({done.returncode}): {done.stderr[-1500:]}")
    from pue.export.tiny_models import build_tiny_model

    build_tiny_model(out, arch="llava_next", preset="bench", seed=0, overwrite=True)
    return "typer missing: built with pue.export.tiny_models.build_tiny_model"


def export_bundle(workdir: Path) -> str:
    out = workdir / "fp32"
    if has_module("typer"):
        # the parity gate runs in onnxruntime: on CPU, because this machine's onnxruntime may be the CPU build
        done = cli("onnx", str(workdir / "checkpoint"), "-o", str(out), "--overwrite")
        if done.returncode == 0:
            return f"pue-export onnx {workdir / 'checkpoint'} -o {out}"
        if done.returncode == 3:
            raise RuntimeError(f"the FP32 export's parity gate failed: {done.stderr[-1500:]}")
        failure = done.stderr[-800:]
    else:
        failure = "typer missing"
    from pue.export.onnx_bundle import export_onnx_bundle

    export_onnx_bundle(workdir / "checkpoint", out, overwrite=True, heldout=heldout_patches())
    return f"CLI unavailable ({failure.strip()}); exported with pue.export.onnx_bundle.export_onnx_bundle"


# --- measurements --------------------------------------------------------------------------------------------


def latency(embed: Callable[[list[Any]], Any], images: list[Any], batch: int, warmup: int, iters: int) -> dict:
    items = (images * (batch // max(len(images), 1) + 1))[:batch]
    for _ in range(warmup):
        embed(items)
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        embed(items)
        times.append(time.perf_counter() - started)
    p50 = statistics.median(times)
    return {
        "p50_ms": round(p50 * 1e3, 3),
        "p90_ms": round(float(np.percentile(times, 90)) * 1e3, 3),
        "items_per_s": round(batch / p50, 2),
        "iters": iters,
    }


def measure(
    run: Run, row: Row, embedder: Any, gate_set: Any, reference: dict | None, images: list[Any], quick: bool
) -> dict:
    from pue.fidelity import measure_fidelity

    started = time.perf_counter()
    embeddings = gate_set.embed(embedder)
    if reference is not None:
        report = measure_fidelity(embeddings, reference)
        overall = report.overall
        row.mean_cosine, row.min_cosine = overall["mean_cosine"], overall["min_cosine"]
        row.top1, row.centered_mean_cosine = overall["top1"], overall["centered_mean_cosine"]
        row.gate_passed = report.passed
    warmup, iters = (1, 3) if quick else (run.args.warmup, run.args.iters)
    for batch in run.args.batch_sizes:
        if run.over_budget():
            row.reason = (row.reason + "; " if row.reason else "") + f"batch {batch} latency skipped: time budget"
            continue
        row.latency[str(batch)] = latency(embedder.embed_images, images, batch, warmup, iters)
    row.status = "ran"
    row.seconds = round(time.perf_counter() - started, 1)
    write_json(run)
    return embeddings


def guarded(run: Run, row: Row, action: Callable[[], Any]) -> Any:
    if row.status == "not run":
        return None
    if run.over_budget():
        row.status, row.reason = "not run", f"time budget of {run.args.budget_s:.0f} s used up"
        return None
    try:
        return action()
    except Exception as exc:
        row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"
        row.latency.setdefault("traceback", {"text": traceback.format_exc()[-1500:]})  # type: ignore[dict-item]
        return None
    finally:
        gc.collect()
        write_json(run)


def compare_backends(run: Run, workdir: Path) -> None:
    from PIL import Image

    from pue.gate_set import GATE_MODIFIERS, GATE_TEXTS, GateSet

    paths = heldout_patches()
    if len(paths) < 8:
        raise RuntimeError(f"expected the shipped held-out patches under pue/data/patches/heldout, found {len(paths)}")
    images = [Image.open(p).convert("RGB") for p in paths]
    fidelity_images = images[: run.args.fidelity_images]
    composed = min(len(fidelity_images), len(GATE_MODIFIERS))
    gate_set = GateSet(fidelity_images, list(GATE_TEXTS), fidelity_images[:composed], list(GATE_MODIFIERS[:composed]))
    latency_images = images[len(images) // 2 :]  # held-out patches the fidelity set does not use first
    rows = {row.name: row for row in run.rows}
    device = run.args.device
    bundle = workdir / "fp32"
    reference: dict | None = None

    def reference_row(dtype: str, row: Row, baseline: dict | None) -> dict:
        import torch

        from pue.export import ReferenceEmbedder

        embedder = ReferenceEmbedder.load(workdir / "checkpoint", device=device, dtype=dtype, tile_size=224)
        if baseline is None:
            row.reason = "the baseline: every other row is compared with it"
        try:
            return measure(run, row, embedder, gate_set, baseline, latency_images, quick=device == "cpu")
        finally:
            if hasattr(embedder, "close"):
                embedder.close()
            del embedder
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    for dtype in REFERENCE_DTYPES:
        row = rows[f"pytorch-{PRECISION_NAMES[dtype]}"]
        got = guarded(run, row, functools.partial(reference_row, dtype, row, reference))
        if dtype == "float32":
            reference = got
            if reference is None:
                for other in run.rows[1:]:
                    if other.status == "planned":
                        other.status, other.reason = "not run", "no fp32 reference to compare with"
                return

    from pue.runtime import Embedder

    def runtime_row(row: Row, path: Path, **load: Any) -> Callable[[], dict]:
        def action() -> dict:
            with Embedder.load(path, **load) as embedder:
                return measure(run, row, embedder, gate_set, reference, latency_images, quick=load["device"] == "cpu")

        return action

    guarded(run, rows["onnxruntime-cpu-fp32"], runtime_row(rows["onnxruntime-cpu-fp32"], bundle, device="cpu"))
    guarded(run, rows["onnxruntime-cuda-fp32"], runtime_row(rows["onnxruntime-cuda-fp32"], bundle, device=device))
    os.environ["PUE_ORT_GPU_PROVIDER"] = "tensorrt"
    try:
        guarded(
            run,
            rows["onnxruntime-tensorrt-ep-fp32"],
            runtime_row(rows["onnxruntime-tensorrt-ep-fp32"], bundle, device=device),
        )
    finally:
        os.environ.pop("PUE_ORT_GPU_PROVIDER", None)

    def engines() -> dict:
        from pue.export.tensorrt.build import TrtOptions, build_engine_bundle
        from pue.export.tensorrt.profiles import parse_batch

        max_batch = max(run.args.batch_sizes)
        options = TrtOptions(
            batch=parse_batch(f"1:{max_batch}:{max_batch}"), timing_cache=workdir / "timing.cache", device=device
        )
        result = build_engine_bundle(
            bundle,
            workdir / "engines",
            options,
            overwrite=True,
            gate_set=gate_set,
            progress=lambda message: print(f"  · {message}", flush=True),
        )
        rows["tensorrt-fp32"].reason = (
            f"engine build {sum(m.build_seconds for m in result.engines.values()):.0f} s; "
            f"gate vs parent mean cosine {result.gate.overall['mean_cosine']:.5f}"
        )
        return runtime_row(rows["tensorrt-fp32"], result.bundle, device=device)()

    guarded(run, rows["tensorrt-fp32"], engines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out, help="JSON results (default $OUT/gpu_check.json)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the checkpoint and bundles go (default: a temporary directory)",
    )
    parser.add_argument("--dry-run", action="store_true", help="parse, plan and print the table; load no model")
    parser.add_argument("--reuse", action="store_true", help="keep a checkpoint and FP32 bundle already in --workdir")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated latency batch sizes")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--fidelity-images", type=int, default=16, help="held-out patches in the fidelity set")
    args = parser.parse_args(argv)
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cuda, cuda:N or cpu, not {args.device!r}")
    try:
        args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be integers separated by commas, not {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args)
    run.environment = describe_environment(args.device, args.dry_run)
    run.rows = plan_rows(args.device, run.environment)
    if args.dry_run:
        for row in run.rows:
            if row.status == "planned":
                row.status = "dry-run"
        run.steps.append({"name": "dry run", "status": "ran", "detail": "no checkpoint, bundle or model was made"})
    else:
        import tempfile

        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pue-gpu-check-"))
        workdir.mkdir(parents=True, exist_ok=True)
        run.environment["workdir"] = str(workdir)
        try:
            if args.reuse and (workdir / "checkpoint" / "config.json").exists():
                run.steps.append(
                    {
                        "name": "checkpoint (tiny-model --preset bench)",
                        "status": "ran",
                        "detail": f"reused {workdir / 'checkpoint'}",
                    }
                )
            else:
                step(run, "checkpoint (tiny-model --preset bench)", lambda: make_checkpoint(workdir))
            if args.reuse and (workdir / "fp32" / "manifest.json").exists():
                run.steps.append(
                    {"name": "FP32 bundle (pue-export onnx)", "status": "ran", "detail": f"reused {workdir / 'fp32'}"}
                )
            else:
                step(run, "FP32 bundle (pue-export onnx)", lambda: export_bundle(workdir))
            step(run, "compare backends", lambda: compare_backends(run, workdir))
        except Exception:
            for row in run.rows:
                if row.status == "planned":
                    row.status, row.reason = "not run", "an earlier step failed (see steps)"
        except KeyboardInterrupt:  # the shell wrapper's timeout: keep what was measured
            for row in run.rows:
                if row.status == "planned":
                    row.status, row.reason = "not run", "interrupted (time limit)"
            run.steps.append({"name": "interrupted", "status": "failed", "error": "time limit reached"})
    write_json(run)
    print(table(run))
    result = run.to_dict()
    print(
        f"\n{'PASSED' if result['passed'] else 'FAILED'} in {result['elapsed_s']} s"
        + (f"; JSON: {args.out}" if args.out else "")
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
