"""`pue-bench pmeb`: every task on every bundle, next to the PyTorch reference, written as it goes.

Order of work: tasks are all read and checked first (a bad task fails before any model loads); with
`reference`, its recorded sha256 is checked against every bundle's `source_checkpoint`, then the reference's
embeddings come from the cache or are computed (torch is imported only on a cache miss, and freed before
the bundles run); then each bundle runs every task. After each finished task the report so far is written
(report.json and report.md, atomically), so an interrupted run keeps what finished. With `embeddings_output`
every run's embeddings of every task are saved in HOMIE's npz layout (saved.py); `embeddings=` scores such
files instead of running bundles.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pue.benchmarks.environment import collect_environment
from pue.benchmarks.pmeb.cache import EmbeddingCache, default_cache_dir, reference_key
from pue.benchmarks.pmeb.evaluate import (
    TaskResult,
    compare,
    disagreement_margins,
    embed_task,
    evaluate_task,
    score_task,
)
from pue.benchmarks.pmeb.homie import distinct_embeddings
from pue.benchmarks.pmeb.report import require_matplotlib, write_partial_report, write_pmeb_report
from pue.benchmarks.pmeb.saved import match_task, read_saved_embeddings, write_saved_embeddings
from pue.benchmarks.pmeb.tasks import Task, discover_tasks
from pue.benchmarks.pmeb.topk import TIE_ORDERS
from pue.bundle import manifest_sha256, read_manifest
from pue.errors import PueError

__all__ = ["evaluate_task", "run_pmeb", "write_pmeb_report"]

SCHEMA_VERSION = 1
REFERENCE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class ReferenceMismatchError(PueError):
    """`--reference` is not the checkpoint a bundle was exported from."""


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    name: str
    backend: str
    precision: str
    source_name: str
    source_sha256: str
    recipe: dict[str, Any]
    tile_size: int
    manifest_sha256: str
    embedding_dim: int  # below the model's width where the bundle makes a Matryoshka cut: the reference cuts alike

    @property
    def reference_setup(self) -> str:
        """Bundles sharing a recipe, tile size and output dimension share the reference's embeddings."""
        identity = [self.recipe, self.tile_size, self.embedding_dim]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_bundle_info(path: Path) -> BundleInfo:
    manifest = read_manifest(path)
    return BundleInfo(
        path=Path(path),
        name=Path(path).resolve().name,
        backend=manifest.backend,
        precision=manifest.precision,
        source_name=manifest.source_checkpoint.name,
        source_sha256=manifest.source_checkpoint.sha256,
        recipe=dict(manifest.recipe),
        tile_size=int(manifest.tile_size),
        manifest_sha256=manifest_sha256(path),
        embedding_dim=int(manifest.embedding_dim),
    )


# --- seams: the heavy parts, replaced by doubles in tests ----------------------------------------------
def open_embedder(path: Path, device: str) -> Any:
    from pue.runtime import Embedder

    return Embedder.load(path, device=device)


def checkpoint_identity(path: Path) -> tuple[str, str]:
    """(name, sha256 of the weights) exactly as `pue-export onnx` records them in a bundle's manifest."""
    from pue.export.checkpoint import checkpoint_sha256, inspect_checkpoint

    info = inspect_checkpoint(path)
    return info.name, checkpoint_sha256(info)


def load_reference(checkpoint: Path, device: str, dtype: str, bundle: BundleInfo) -> Any:
    """The reference with the bundle's recipe, tile size and output dimension (its Matryoshka cut, if any)."""
    from pue.export import ReferenceEmbedder
    from pue.export.recipe import recipe_from_dict

    return ReferenceEmbedder.load(
        checkpoint,
        device=device,
        dtype=dtype,
        tile_size=bundle.tile_size,
        recipe=recipe_from_dict(bundle.recipe, "the bundle's recipe"),
        embedding_dim=bundle.embedding_dim,
    )


# --- the run ------------------------------------------------------------------------------------------
def run_pmeb(
    bundles: list[Path],
    data_dir: Path,
    reference: Path | None = None,
    tasks: list[str] | None = None,
    report_dir: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    reference_dtype: str = "float32",
    embeddings: list[Path] | None = None,
    embeddings_output: Path | None = None,
    tie_order: str = "cuda",
) -> dict[str, Any]:
    """Run the PMEB tasks under `data_dir` on every bundle (and the reference), or score saved `embeddings`
    (HOMIE-layout npz files, no bundles); return the report dict. `embeddings_output` saves each run's
    embeddings as `DIR/<run name>/<task>.npz`; `tie_order` is the torch.topk tie rule of HOMIE's metrics."""
    say = progress or (lambda _message: None)
    if embeddings and (bundles or reference is not None):
        raise PueError("saved embeddings are scored on their own", "pass either bundles or --embeddings, not both")
    if not bundles and not embeddings:
        raise PueError("no bundle to benchmark", "pass one or more bundle directories (or --embeddings FILE.npz)")
    if reference_dtype not in REFERENCE_PRECISION:
        raise PueError(f"unknown reference dtype {reference_dtype!r}", f"use one of: {', '.join(REFERENCE_PRECISION)}")
    if tie_order not in TIE_ORDERS:
        raise PueError(f"unknown tie order {tie_order!r}", f"use one of: {', '.join(TIE_ORDERS)}")
    if report_dir is not None:
        require_matplotlib()
    task_list = discover_tasks(Path(data_dir), tasks)
    saved = [read_saved_embeddings(Path(path)) for path in embeddings or []]
    saved_tasks = [match_task(s, task_list) for s in saved]
    infos = [read_bundle_info(Path(b)) for b in bundles]
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "pmeb",
        "status": "partial",
        "environment": collect_environment(),
        "config": {
            "data_dir": str(data_dir),
            "device": device,
            "tie_order": tie_order,
            "tasks": [
                {"name": t.name, "meta_task": t.meta_task, "folder": str(t.folder), "size": t.size} for t in task_list
            ],
            "embeddings": [str(s.path) for s in saved],
            "bundles": [
                {
                    "name": b.name,
                    "path": str(b.path),
                    "backend": b.backend,
                    "precision": b.precision,
                    "manifest_sha256": b.manifest_sha256,
                    "source_checkpoint": b.source_name,
                }
                for b in infos
            ],
            "reference": None,
        },
        "results": [],
    }

    def save() -> None:
        if report_dir is not None:
            write_partial_report(report, Path(report_dir))

    if reference is not None:
        name, sha256 = check_reference(Path(reference), infos)
        report["config"]["reference"] = {
            "path": str(reference),
            "name": name,
            "sha256": sha256,
            "dtype": reference_dtype,
            "precision": REFERENCE_PRECISION[reference_dtype],
        }

    def finished(
        result: TaskResult, task: Task, name: str, backend: str, precision: str, ref: TaskResult | None
    ) -> None:
        _add_rows(report, result, name, backend, precision, ref)
        if embeddings_output is not None:
            write_saved_embeddings(
                Path(embeddings_output) / _safe(name) / f"{_safe(task.name)}.npz",
                task,
                result.embeddings,
                name,
                backend,
                precision,
            )
        save()

    try:
        for entry, task in zip(saved, saved_tasks, strict=True):
            say(f"{entry.name}: scoring {entry.path.name} on {task.name}")
            records = (entry.query, entry.candidate)
            result = score_task(task, distinct_embeddings(task, *records), records, tie_order)
            finished(result, task, entry.name, entry.backend, entry.precision, None)
        _run(report, task_list, infos, reference, cache_dir, device, reference_dtype, say, finished, tie_order)
    except BaseException as exc:  # keep what finished, and say why the rest is missing
        report["status"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        report["error"] = f"{type(exc).__name__}: {exc}"
        save()
        raise
    report["status"] = "complete"
    if report_dir is not None:
        write_pmeb_report(report, Path(report_dir))
    return report


def _run(
    report: dict[str, Any],
    task_list: list[Task],
    infos: list[BundleInfo],
    reference: Path | None,
    cache_dir: Path | None,
    device: str,
    dtype: str,
    say: Callable[[str], None],
    finished: Callable[..., None],
    tie_order: str,
) -> None:
    references: dict[tuple[str, str], TaskResult] = {}
    if reference is not None:
        name, sha256 = report["config"]["reference"]["name"], report["config"]["reference"]["sha256"]
        cache = EmbeddingCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        setups = {b.reference_setup: b for b in infos}
        for setup, bundle in setups.items():
            label = name if len(setups) == 1 else f"{name} @{bundle.tile_size}px/{bundle.recipe.get('name', '?')}"
            if len(setups) > 1 and len({b.embedding_dim for b in infos}) > 1:
                label += f"/{bundle.embedding_dim}d"

            def reference_finished(result: TaskResult, task: Task, label: str = label) -> None:
                finished(result, task, label, "pytorch", REFERENCE_PRECISION[dtype], result)

            references.update(
                _reference_results(
                    task_list,
                    Path(reference),
                    sha256,
                    bundle,
                    setup,
                    cache,
                    device,
                    dtype,
                    say,
                    reference_finished,
                    tie_order,
                )
            )
    for bundle in infos:
        say(f"{bundle.name}: loading")
        embedder = open_embedder(bundle.path, device)
        try:
            for task in task_list:
                result = score_task(task, embed_task(task, embedder, say, f"{bundle.name}: "), tie_order=tie_order)
                reference_result = references.get((bundle.reference_setup, task.name))
                finished(result, task, bundle.name, bundle.backend, bundle.precision, reference_result)
        finally:
            _close(embedder)


def check_reference(checkpoint: Path, bundles: list[BundleInfo]) -> tuple[str, str]:
    """Refuse a `--reference` whose weights are not every bundle's recorded source checkpoint."""
    name, sha256 = checkpoint_identity(checkpoint)
    wrong = [b for b in bundles if b.source_sha256 != sha256]
    if wrong:
        built = "; ".join(f"{b.name} from '{b.source_name}' (sha256 {b.source_sha256[:12]}…)" for b in wrong)
        raise ReferenceMismatchError(
            f"--reference {checkpoint} (weights sha256 {sha256[:12]}…) is not the source checkpoint of: {built}",
            "pass the checkpoint these bundles were exported from, or leave out --reference",
        )
    return name, sha256


def _reference_results(
    task_list: list[Task],
    checkpoint: Path,
    sha256: str,
    bundle: BundleInfo,
    setup: str,
    cache: EmbeddingCache,
    device: str,
    dtype: str,
    say: Callable[[str], None],
    finished: Callable[[TaskResult, Task], None],
    tie_order: str,
) -> dict[tuple[str, str], TaskResult]:
    results: dict[tuple[str, str], TaskResult] = {}
    embedder = None
    try:
        for task in task_list:
            key = reference_key(task, sha256, bundle.recipe, bundle.tile_size, dtype, bundle.embedding_dim)
            embeddings = cache.load(task.name, key)
            if embeddings is None:
                if embedder is None:
                    say(f"reference: loading {checkpoint} ({dtype}, {device})")
                    embedder = load_reference(checkpoint, device, dtype, bundle)
                embeddings = embed_task(task, embedder, say, "reference: ")
                cache.save(task.name, key, embeddings)
            else:
                say(f"reference: {task.name} (cached)")
            results[(setup, task.name)] = score_task(task, embeddings, tie_order=tie_order)
            finished(results[(setup, task.name)], task)
    finally:
        if embedder is not None:
            _close(embedder)
    return results


def _add_rows(
    report: dict[str, Any], result: TaskResult, name: str, backend: str, precision: str, reference: TaskResult | None
) -> None:
    agreement, cosine, by_embedding = compare(result, reference) if reference is not None else ({}, None, None)
    margins = disagreement_margins(result, reference) if reference is not None else {}
    for metric, value in result.metrics.items():
        key = result.metric_predictions.get(metric)
        reference_value = reference.metrics.get(metric) if reference is not None else None
        report["results"].append(
            {
                "name": name,
                "backend": backend,
                "precision": precision,
                "task": result.task,
                "meta_task": result.meta_task,
                "metric": metric,
                "homie_name": result.homie_names.get(metric),
                "value": value,
                "reference_value": reference_value,
                "delta": None if reference_value is None else value - reference_value,
                "prediction_agreement": agreement.get(key) if reference is not None else None,
                "mean_cosine_vs_reference": cosine,
                "cosine_by_embedding": by_embedding,
                "predictions": key,
                "queries": result.queries.get(key),
                **margins.get(key, {}),
            }
        )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def _close(embedder: Any) -> None:
    close = getattr(embedder, "close", None)
    if callable(close):
        close()
