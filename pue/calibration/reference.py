"""The FP32 parent's rows every check and the gate compare a candidate with, run with the candidates' attention.

Where the candidates are judged with fused attention (`--attention fused`, the default for onnxruntime INT8), the
parent's graphs are fused the same way (`pue.optimize.attention.fuse_attention`: the same function, onnxruntime's
attention kernels) and staged as a bundle of their own, which embeds the parent's rows: on the `bench` preset it
embeds 1.2-1.3× as fast as the parent's standard graphs (BENCHMARKS, session 26), and the parent's rows are a third of
a static INT8 run's time. Before it is used, its rows are compared with the parent's own on a few calibration items
(`REFERENCE_ITEMS`); where they do not agree to `REFERENCE_MIN_COSINE`, the parent's graphs embed the rows instead,
and the quantization says so (`fidelity.json["reference"]`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pue.gate_set import GateSet

__all__ = ["REFERENCE_ITEMS", "REFERENCE_MIN_COSINE", "choose_reference", "fused_parent", "reference_agreement"]

REFERENCE_ITEMS = 2  # calibration patches (and as many texts) the fused parent's rows are compared on
REFERENCE_MIN_COSINE = 0.99999  # the fused parent agrees with the parent's own rows at least this well


def fused_parent(parent_dir: Path, manifest: Any, layouts: dict[str, dict[str, Any]], folder: Path) -> Path:
    """The parent bundle's graphs with attention fused, staged in `folder` as a bundle (the parent's manifest, the
    fused graphs' files and hashes, its tokenizer); returns `folder`."""
    import onnx

    from pue.bundle import file_entry, write_manifest
    from pue.graph_files import save_graph
    from pue.optimize.attention import fuse_attention

    folder.mkdir(parents=True, exist_ok=True)
    staged = type(manifest).from_dict(manifest.to_dict())
    for name, spec in manifest.graphs.items():
        fused, _ = fuse_attention(onnx.load(str(parent_dir / spec.file.path)), name, layouts[name])
        data_files = save_graph(fused, folder / f"{name}.onnx")
        del fused
        staged.graphs[name].file = file_entry(folder, f"{name}.onnx")
        staged.graphs[name].external_data = [file_entry(folder, f) for f in data_files]
    tokenizer = manifest.tokenizer.file.path
    (folder / tokenizer).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(parent_dir / tokenizer, folder / tokenizer)
    write_manifest(folder, staged)
    return folder


def reference_agreement(parent: Any, reference: Any, items: GateSet) -> dict[str, float | int]:
    """The reference embedder's rows against the parent's own on `items`: the minimum and mean cosine, and the
    item count."""
    ours, theirs = items.embed(reference), items.embed(parent)
    cosines = np.concatenate([np.sum(ours[kind] * theirs[kind], axis=1) for kind in theirs])
    return {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean()), "count": int(len(cosines))}


def choose_reference(
    parent: Any,
    bundle: tuple[Path, Any],
    layouts: dict[str, dict[str, Any]] | None,
    folder: Path,
    items: GateSet,
    say: Callable[[str], None],
) -> tuple[Callable[..., list[dict[str, np.ndarray]]], dict[str, Any]]:
    """What embeds the parent's rows: the fused parent (`fused_parent`, in `folder`) where the candidates run fused
    attention (`layouts`) and its rows agree with the parent's on the first `REFERENCE_ITEMS` patches and texts of
    `items`; else the parent (`bundle`: its folder and manifest). Returns a function that embeds any gate sets with it
    (one load for all), and the record `fidelity.json["reference"]` keeps."""
    from pue.runtime import Embedder

    def by_parent(*sets: GateSet) -> list[dict[str, np.ndarray]]:
        return [items.embed(parent) for items in sets]

    if layouts is None:
        return by_parent, {"graphs": "parent"}
    fused = fused_parent(*bundle, layouts, folder)
    sample = GateSet(
        images=items.images[:REFERENCE_ITEMS],
        texts=items.texts[:REFERENCE_ITEMS],
        composed_images=[],
        composed_texts=[],
    )
    with Embedder.load(fused) as reference:
        agreement = reference_agreement(parent, reference, sample)
    if agreement["min_cosine"] < REFERENCE_MIN_COSINE:
        say(
            f"reference rows: the parent's graphs with fused attention agree with the parent's own to min cos "
            f"{agreement['min_cosine']:.7f} on {agreement['count']} items (< {REFERENCE_MIN_COSINE}): the parent's "
            "graphs embed them"
        )
        return by_parent, {"graphs": "parent", "fused_agreement": agreement}
    say(
        f"reference rows: the parent's graphs with fused attention, as the candidates run (min cos "
        f"{agreement['min_cosine']:.7f} to the parent's own on {agreement['count']} items)"
    )

    def by_fused(*sets: GateSet) -> list[dict[str, np.ndarray]]:
        with Embedder.load(fused) as reference:
            return [items.embed(reference) for items in sets]

    return by_fused, {"graphs": "parent, attention fused", "agreement": agreement}
