"""Where a bundle's time goes: onnxruntime's own profiler over one batch of image rows, summed per op type.

The graphs run in sessions made like the runtime's (`default_session_options`, CPU provider) on the inputs the
runtime would send for a batch of the shipped held-out patches: `vision.onnx` on their pixels, `decoder.onnx` on
the image prompts with those features. One untimed run, then `runs` profiled ones; per graph the wall time of a
run and, per op type, the summed kernel time, its share and the node count.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pue.errors import PueError


def profile_bundle(
    bundle: str | Path, batch_size: int = 8, runs: int = 1, images: list[Path] | None = None
) -> dict[str, Any]:
    """{"bundle", "precision", "batch_size", "graphs": {name: {"wall_ms", "kernel_ms", "ops": [...]}}}."""
    from pue.bundle import read_manifest, verify_files
    from pue.data import patch_set
    from pue.runtime.backends.onnxruntime import default_session_options, import_onnxruntime
    from pue.runtime.images import load_tiles
    from pue.runtime.preprocess import ImagePreprocessor
    from pue.runtime.prompts import PromptTokenizer

    if batch_size < 1 or runs < 1:
        raise PueError(f"batch size and runs must be at least 1, got {batch_size} and {runs}")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)
    if images is None:
        images = patch_set("heldout")
    if not images:
        raise PueError("no images to profile with")
    # Inputs made the way the runtime makes them, without loading the graphs twice (an 8 B bundle is 32 GB).
    batch = [images[i % len(images)] for i in range(batch_size)]
    vision_input = manifest.graphs["vision"].inputs[0]
    pixels = ImagePreprocessor(manifest.preprocessing)(load_tiles(batch, manifest.tile_size))
    prompts = PromptTokenizer.for_bundle(bundle, manifest)
    input_ids, attention_mask = prompts.pad([prompts.image_prompt()] * batch_size)
    features_dtype = next(i.dtype for i in manifest.graphs["decoder"].inputs if i.name == "image_features")
    feeds = {
        "vision": {vision_input.name: pixels.astype(vision_input.dtype, copy=False)},
        "decoder": {"input_ids": input_ids, "attention_mask": attention_mask},
    }
    ort = import_onnxruntime()
    graphs = {}
    with tempfile.TemporaryDirectory(prefix="pue-profile-") as scratch:
        for name in ("vision", "decoder"):  # the decoder reads the vision graph's features
            spec = manifest.graphs[name]
            options = default_session_options()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(scratch) / name)
            session = ort.InferenceSession(str(bundle / spec.file.path), options, providers=["CPUExecutionProvider"])
            warm = session.run(None, feeds[name])  # untimed; the vision one gives the decoder its features
            if name == "vision":
                feeds["decoder"]["image_features"] = warm[0].astype(features_dtype, copy=False)
            walls = []
            for _ in range(runs):
                started = time.perf_counter()
                session.run(None, feeds[name])
                walls.append(time.perf_counter() - started)
            events = json.loads(Path(session.end_profiling()).read_text())
            graphs[name] = summarize(events, runs) | {"wall_ms": 1000 * float(np.median(walls))}
    return {
        "bundle": str(bundle),
        "precision": manifest.precision,
        "batch_size": batch_size,
        "runs": runs,
        "sequence_length": int(input_ids.shape[1]),
        "graphs": graphs,
    }


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
