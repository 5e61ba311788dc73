"""Where a bundle's time goes: the backend's own profiler over one batch of image rows, summed per op type.

The bundle is opened by the runtime (`Embedder` on the onnxruntime or OpenVINO backend, CPU) with the profiler
passed through as a backend option (onnxruntime's profiler; OpenVINO's per-layer performance counters, whose op
types are OpenVINO's after its graph transformations, e.g. FullyConnected, with the kernels it chose), and fed
what the runtime sends for a batch of the shipped held-out patches: `vision.onnx` on
their pixels, `decoder.onnx` on the image prompts with those features. One untimed run, then `runs` profiled ones;
per graph the wall time of a run and, per op type, the summed kernel time, its share and the node count.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pue.errors import PueError
from pue.runtime.backends.base import decoder_feed

PROFILED_BACKENDS = ("onnxruntime", "openvino")


def profile_bundle(
    bundle: str | Path,
    batch_size: int = 8,
    runs: int = 1,
    images: list[Path] | None = None,
    backend: str = "onnxruntime",
) -> dict[str, Any]:
    """{"bundle", "backend", "precision", "batch_size", "graphs": {name: {"wall_ms", "kernel_ms", "ops": [...]}}}."""
    from pue.data import patch_set
    from pue.runtime import Embedder

    if batch_size < 1 or runs < 1:
        raise PueError(f"batch size and runs must be at least 1, got {batch_size} and {runs}")
    if backend not in PROFILED_BACKENDS:
        raise PueError(f"no profiler for backend '{backend}'", f"choose one of: {', '.join(PROFILED_BACKENDS)}")
    bundle = Path(bundle)
    if images is None:
        images = patch_set("heldout")
    if not images:
        raise PueError("no images to profile with")
    batch = [images[i % len(images)] for i in range(batch_size)]
    graphs: dict[str, dict[str, Any]] = {}
    layers: dict[str, list[list[dict[str, Any]]]] = {"vision": [], "decoder": []}  # OpenVINO: counters per run
    with (
        tempfile.TemporaryDirectory(prefix="pue-profile-") as scratch,
        Embedder.load(
            bundle,
            backend=backend,
            device="cpu",
            options={"profile_dir": scratch} if backend == "onnxruntime" else {"perf_counters": True},
        ) as embedder,
    ):
        vision, decoder = embedder.backend.vision, embedder.backend.decoder
        pixels = embedder.pixel_values(batch)
        input_ids, attention_mask = embedder.prompts.pad([embedder.prompts.image_prompt()] * batch_size)
        feeds = {
            "vision": {"pixel_values": pixels.astype(_input_dtype(vision, "pixel_values"), copy=False)},
            "decoder": {"input_ids": input_ids, "attention_mask": attention_mask},
        }
        for name, runner in (("vision", vision), ("decoder", decoder)):  # the decoder reads the vision features
            warm = runner.infer(feeds[name])  # untimed; the vision one gives the decoder its features
            if name == "vision":
                feeds["decoder"] = decoder_feed(
                    decoder.input_metadata(),
                    input_ids,
                    attention_mask,
                    warm,
                    np.arange(batch_size),
                    embedder.manifest.hidden_size,
                )
            walls = []
            for _ in range(runs):
                runner.infer(feeds[name])
                walls.append(runner.last_inference_time)
                if backend == "openvino":
                    layers[name].append(runner.profiling_data())  # the counters of the last inference only
            graphs[name] = {"wall_ms": 1000 * float(np.median(walls))}
        if backend == "onnxruntime":
            for name, path in embedder.backend.end_profiling().items():
                graphs[name] = summarize(json.loads(Path(path).read_text()), runs) | graphs[name]
        else:
            for name, per_run in layers.items():
                graphs[name] = summarize_openvino(per_run) | graphs[name]
        precision = embedder.manifest.precision
        inference_precision = getattr(embedder.backend, "inference_precision", None)
    return {
        "bundle": str(bundle),
        "backend": backend,
        "inference_precision": inference_precision,
        "precision": precision,
        "batch_size": batch_size,
        "runs": runs,
        "sequence_length": int(input_ids.shape[1]),
        "graphs": graphs,
    }


def _input_dtype(runner: Any, name: str) -> np.dtype:
    return np.dtype(next(spec.dtype for spec in runner.input_metadata() if spec.name == name))


def summarize(events: list[dict[str, Any]], runs: int) -> dict[str, Any]:
    """Kernel time per op type over the last `runs` model runs of an onnxruntime profile (warm-up left out)."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(starts) < runs:
        raise PueError(f"the profile holds {len(starts)} runs, expected at least {runs}")
    first = starts[-runs]
    time_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if event["ts"] < first:
            continue
        op = event.get("args", {}).get("op_name", "?")
        time_us[op] += float(event["dur"])
        count[op] += 1
    return _per_op(time_us, count, runs)


def summarize_openvino(per_run: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Layer time per OpenVINO op type over the profiled runs (`OpenVinoRunner.profiling_data` of each), with the
    kernels OpenVINO chose (`exec_type`, e.g. brgemm_avx2_f32) for each op type, the part of it spent in int8
    kernels (`int8_ms`), and for the matmul layers (FullyConnected, FullyConnectedCompressed, Convolution, MatMul)
    together: their time, how much of it ran in kernels the counters name int8, how many of their layers did, and how
    many hold int8 weights whose activations OpenVINO quantizes at run time (`compressed_layers`; the counters name
    those kernels f32) (`matmuls`)."""
    from pue.runtime.backends.openvino import COMPRESSED_LAYER, MATMUL_LAYERS, int8_kernel

    time_us: dict[str, float] = defaultdict(float)
    int8_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    kernels: dict[str, set[str]] = defaultdict(set)
    matmul = {"us": 0.0, "int8_us": 0.0, "layers": 0, "int8_layers": 0, "compressed_layers": 0}
    for layers in per_run:
        for layer in layers:
            if layer["status"] != "EXECUTED":
                continue
            kind, us, int8 = layer["node_type"], layer["real_time_us"], int8_kernel(layer["exec_type"])
            time_us[kind] += us
            int8_us[kind] += us if int8 else 0.0
            count[kind] += 1
            kernels[kind].add(layer["exec_type"])
            if kind in MATMUL_LAYERS:
                matmul["us"] += us
                matmul["int8_us"] += us if int8 else 0.0
                matmul["layers"] += 1
                matmul["int8_layers"] += int(int8)
                matmul["compressed_layers"] += int(kind == COMPRESSED_LAYER)
    runs = len(per_run)
    summary = _per_op(time_us, count, runs)
    for op in summary["ops"]:
        op["kernels"] = sorted(kernels[op["op_type"]])
        op["int8_ms"] = int8_us[op["op_type"]] / 1000 / runs
    summary["matmuls"] = {
        "ms": matmul["us"] / 1000 / runs,
        "int8_ms": matmul["int8_us"] / 1000 / runs,
        "int8_share": matmul["int8_us"] / matmul["us"] if matmul["us"] else 0.0,
        "layers": matmul["layers"] // runs,
        "int8_layers": matmul["int8_layers"] // runs,
        "compressed_layers": matmul["compressed_layers"] // runs,
    }
    return summary


def _per_op(time_us: dict[str, float], count: dict[str, int], runs: int) -> dict[str, Any]:
    total = sum(time_us.values())
    ops = [
        {"op_type": op, "ms": us / 1000 / runs, "share": us / total if total else 0.0, "nodes": count[op] // runs}
        for op, us in sorted(time_us.items(), key=lambda item: -item[1])
    ]
    return {"kernel_ms": total / 1000 / runs, "ops": ops}
