"""Where a bundle's time goes: onnxruntime's own profiler over one batch of image rows, summed per op type.

The bundle is opened by the runtime (`Embedder` on the onnxruntime backend, CPU) with the profiler passed through
as a backend option, and fed what the runtime sends for a batch of the shipped held-out patches: `vision.onnx` on
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


def profile_bundle(
    bundle: str | Path, batch_size: int = 8, runs: int = 1, images: list[Path] | None = None
) -> dict[str, Any]:
    """{"bundle", "precision", "batch_size", "graphs": {name: {"wall_ms", "kernel_ms", "ops": [...]}}}."""
    from pue.data import patch_set
    from pue.runtime import Embedder

    if batch_size < 1 or runs < 1:
        raise PueError(f"batch size and runs must be at least 1, got {batch_size} and {runs}")
    bundle = Path(bundle)
    if images is None:
        images = patch_set("heldout")
    if not images:
        raise PueError("no images to profile with")
    batch = [images[i % len(images)] for i in range(batch_size)]
    graphs = {}
    with (
        tempfile.TemporaryDirectory(prefix="pue-profile-") as scratch,
        Embedder.load(bundle, backend="onnxruntime", device="cpu", options={"profile_dir": scratch}) as embedder,
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
                features = warm["image_features"]
                feeds["decoder"]["image_features"] = features.astype(_input_dtype(decoder, "image_features"))
            walls = []
            for _ in range(runs):
                runner.infer(feeds[name])
                walls.append(runner.last_inference_time)
            graphs[name] = {"wall_ms": 1000 * float(np.median(walls))}
        for name, path in embedder.backend.end_profiling().items():
            graphs[name] = summarize(json.loads(Path(path).read_text()), runs) | graphs[name]
        precision = embedder.manifest.precision
    return {
        "bundle": str(bundle),
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
    total = sum(time_us.values())
    ops = [
        {"op_type": op, "ms": us / 1000 / runs, "share": us / total if total else 0.0, "nodes": count[op] // runs}
        for op, us in sorted(time_us.items(), key=lambda item: -item[1])
    ]
    return {"kernel_ms": total / 1000 / runs, "ops": ops}
