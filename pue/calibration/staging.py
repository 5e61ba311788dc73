"""Staging a candidate's graphs as a bundle in the derivation's staging folder, and measuring it there.

The INT8 search stages every candidate it judges (the last one staged is what `pue-export quantize` writes); the
fallback's end-to-end ranking stages simulated candidates that differ from each other in one graph, and `Staged`
keeps the others from being written and hashed again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pue.bundle import FileEntry, Manifest, file_entry, write_manifest
from pue.derive import Derivation
from pue.fidelity import FidelityThresholds, GateReport, measure_fidelity
from pue.gate_set import GateSet
from pue.precisions import PrecisionSpec


@dataclass
class Staged:
    """The graphs the staging folder holds for the fallback's ranking: per graph, the model object last written and
    its manifest entries. A simulated candidate differs from the previous one in one graph only, so the others are
    neither written nor hashed again; any other staging (a real candidate) clears it."""

    models: dict[str, Any] = field(default_factory=dict)
    written: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    entries: dict[str, tuple[FileEntry, list[FileEntry]]] = field(default_factory=dict)

    def clear(self) -> None:
        self.models.clear()
        self.written.clear()
        self.entries.clear()


@dataclass
class VisionMemo:
    """The vision graph's outputs per batch of pixels, for one vision graph (its files' hashes): a candidate whose
    vision graph is byte for byte the previous one's (the kind-balance attempt changes decoder ops only) gets the
    same outputs for the same batch without running it again. Another graph clears it; at most `limit_bytes` kept."""

    key: tuple[str, ...] = ()
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    limit_bytes: int = 1 << 30
    hits: int = 0

    def runner(self, runner: Any, key: tuple[str, ...]) -> Any:
        """`runner` with its `infer` answered from the memo where it holds the batch (keyed by `key`)."""
        if key != self.key:
            self.key, self.outputs = key, {}
        return _MemoRunner(runner, self)

    def size(self) -> int:
        return sum(value.nbytes for outputs in self.outputs.values() for value in outputs.values())


class _MemoRunner:
    """A vision runner whose `infer` reads and fills a `VisionMemo`; everything else is the runner's."""

    def __init__(self, runner: Any, memo: VisionMemo) -> None:
        self._runner, self._memo = runner, memo

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        digest = hashlib.sha256()
        for name in sorted(feed):
            value = np.ascontiguousarray(feed[name])
            digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
            digest.update(value.data)
        batch = digest.hexdigest()
        if batch in self._memo.outputs:
            self._memo.hits += 1
            return {name: value.copy() for name, value in self._memo.outputs[batch].items()}
        outputs = self._runner.infer(feed)
        if self._memo.size() + sum(np.asarray(v).nbytes for v in outputs.values()) <= self._memo.limit_bytes:
            self._memo.outputs[batch] = {name: np.array(value) for name, value in outputs.items()}
        return outputs


def write_graphs(
    models: dict[str, Any], staging: Path, staged: Staged | None = None
) -> dict[str, tuple[str, list[str]]]:
    from pue.graph_files import save_graph

    written = {}
    for name, model in models.items():
        if staged is not None and staged.models.get(name) is model:
            written[name] = staged.written[name]
            continue
        for stale in staging.glob(f"{name}.onnx*"):
            stale.unlink()
        written[name] = (f"{name}.onnx", save_graph(model, staging / f"{name}.onnx"))
        if staged is not None:
            staged.models[name], staged.written[name] = model, written[name]
            staged.entries.pop(name, None)
    return written


def staged_manifest(
    child: Derivation,
    written: dict[str, tuple[str, list[str]]],
    spec: PrecisionSpec,
    entries: dict[str, tuple[FileEntry, list[FileEntry]]] | None = None,
) -> Manifest:
    """The staged bundle's manifest for `spec`; `entries`: graphs' file entries already hashed (reused, filled in)."""
    manifest = child.child_manifest(precision=str(spec.precision), target=str(spec.target))
    manifest.backend = spec.backend or manifest.backend  # the gate runs the backend the entry names (auto picks it)
    known = {} if entries is None else entries
    for name, (filename, data_files) in written.items():
        if name not in known:
            known[name] = (file_entry(child.staging, filename), [file_entry(child.staging, f) for f in data_files])
        manifest.graphs[name].file, manifest.graphs[name].external_data = known[name][0], list(known[name][1])
    manifest.tokenizer.file = file_entry(child.staging, manifest.tokenizer.file.path)
    return manifest


def evaluate_staged(
    models: dict[str, Any],
    child: Derivation,
    gate_set: GateSet,
    reference: dict,
    spec: PrecisionSpec,
    thresholds: FidelityThresholds,
    simulated: Staged | None = None,
    memo: VisionMemo | None = None,
) -> GateReport:
    """Stage `models` as a `spec` bundle and measure them on `gate_set`. `simulated` (the ranking's staging
    record): float graphs carrying Q/DQ arithmetic (`pue.calibration.fake_quant`), run by onnxruntime with its Q/DQ
    fusion off, so the Q/DQ pairs compute in float; graphs it holds as staged are not written again. `memo`: the
    vision outputs of the last vision graph measured, reused where this one's files hash the same."""
    from pue.runtime import Embedder

    written = write_graphs(models, child.staging, simulated)
    entries = None if simulated is None else simulated.entries
    manifest = staged_manifest(child, written, spec, entries)
    write_manifest(child.staging, manifest)
    how: dict[str, Any] = {}
    if simulated is not None:  # verified like any staged bundle: skipping it would log a warning per ranked op
        how = {"backend": "onnxruntime", "options": {"session_config": {"session.disable_quant_qdq": "1"}}}
    with Embedder.load(child.staging, **how) as candidate:
        if memo is not None and "vision" in manifest.graphs:
            entry = manifest.graphs["vision"]
            key = (entry.file.sha256, *(data.sha256 for data in entry.external_data))
            candidate.backend.vision = memo.runner(candidate.backend.vision, key)
        return measure_fidelity(gate_set.embed(candidate), reference, thresholds)


__all__ = ["Staged", "VisionMemo", "evaluate_staged", "staged_manifest", "write_graphs"]
