"""PMEB-mini prediction agreement of a bundle with another bundle (its FP32 parent) rather than with the PyTorch
reference, scored with pue's own `evaluate_task`, `compare` and `disagreement_margins` (items counted as
`scripts/write_benchmarks.py` counts them: every prediction list of every task, HOMIE's included). Used for issue
22's `bench` measurement, where the PyTorch reference costs more than the bundles. Not run by CI.

    python scripts/pmeb_bundle_agreement.py embed BUNDLE OUT.pkl [BACKEND]  # every pmeb-mini task; BACKEND: auto
    python scripts/pmeb_bundle_agreement.py compare A.pkl PARENT.pkl  # A's predictions against PARENT's
    python scripts/pmeb_bundle_agreement.py shared A.pkl PARENT.pkl  # A's error per side: how much is shared
    python scripts/pmeb_bundle_agreement.py noise PARENT.pkl [RMS,RMS,...] [DRAWS]  # what random error flips

`shared` splits A's embedding error per side (images, captions, queries, ...) into the part every item of that side
shares and the rest, then rescores with each side's shared part subtracted (an oracle: the mean is taken on these
items) to show whether it is what flips the lists. `noise` rescores the parent's own embeddings with isotropic
Gaussian error of each root-mean-square size (renormalised; DRAWS draws per size): the agreement a bundle whose
error were unstructured would reach, the yardstick for reading `compare`'s count on near-tied lists.

`embed` saves after each task and skips tasks already in OUT.pkl (a rerun resumes); images shared by tasks are
embedded once.
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class CachedImages:
    """`embed_images` memoised by path (the tasks share held-out patches); everything else passed through."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.memo = inner, {}

    def embed_images(self, images: list) -> np.ndarray:
        missing = [p for p in dict.fromkeys(map(str, images)) if p not in self.memo]
        if missing:
            for path, row in zip(missing, self.inner.embed_images(missing), strict=True):
                self.memo[path] = np.asarray(row)
        return np.stack([self.memo[str(p)] for p in images])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def embed(bundle: str, out: Path, backend: str = "auto") -> None:
    from pue.benchmarks.pmeb import pmeb_mini_dir
    from pue.benchmarks.pmeb.evaluate import evaluate_task
    from pue.benchmarks.pmeb.tasks import discover_tasks
    from pue.runtime import Embedder

    results = pickle.loads(out.read_bytes()) if out.exists() else {}
    with Embedder.load(bundle, backend=backend) as inner:
        embedder = CachedImages(inner)
        print("backend", inner.backend_name, flush=True)
        for task in discover_tasks(pmeb_mini_dir()):
            if task.name in results:
                continue
            started = time.perf_counter()
            results[task.name] = evaluate_task(task, embedder)
            print(task.name, f"{time.perf_counter() - started:.0f} s", results[task.name].metrics, flush=True)
            out.write_bytes(pickle.dumps(results))


def compare(candidate: Path, parent: Path) -> None:
    from pue.benchmarks.pmeb.evaluate import compare as compare_task
    from pue.benchmarks.pmeb.evaluate import disagreement_margins

    mine, theirs = pickle.loads(candidate.read_bytes()), pickle.loads(parent.read_bytes())
    items = agreeing = 0
    for name, result in mine.items():
        if name not in theirs:
            continue
        agreement, cosine, _ = compare_task(result, theirs[name])
        margins = disagreement_margins(result, theirs[name])
        for key, value in agreement.items():
            count = result.queries[key]
            items += count
            agreeing += round(value * count)
            flipped = margins[key]["reference_margin_max_disagreeing"]
            print(
                f"| {name} | {key} | {count} | {margins[key]['disagreements']} | {value:.1%} | "
                f"{'-' if flipped is None else f'{flipped:.4f}'} | {margins[key]['reference_margin_median']:.4f} | "
                f"{cosine:.5f} |"
            )
    print(f"all: {agreeing}/{items} = {agreeing / max(items, 1):.1%}")


# lists that pue's first pmeb-mini table counted (226 items); HOMIE's and answer_to_query came later
LATER_LISTS = ("homie_", "answer_to_query")


def _count(rescored: dict[str, Any], parent: dict[str, Any]) -> tuple[int, int, int, int]:
    """(agreeing, items) over every list and over the first table's lists, of rescored predictions vs parent's."""
    agree = items = first_agree = first_items = 0
    for name, result in rescored.items():
        for key, predicted in result.predictions.items():
            same = int((np.asarray(predicted) == np.asarray(parent[name].predictions[key])).sum())
            count = len(np.asarray(predicted))
            agree, items = agree + same, items + count
            if not key.startswith(LATER_LISTS):
                first_agree, first_items = first_agree + same, first_items + count
    return agree, items, first_agree, first_items


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _tasks() -> dict[str, Any]:
    from pue.benchmarks.pmeb import pmeb_mini_dir
    from pue.benchmarks.pmeb.tasks import discover_tasks

    return {task.name: task for task in discover_tasks(pmeb_mini_dir())}


def shared(candidate: Path, parent: Path) -> None:
    from pue.benchmarks.pmeb.evaluate import score_task

    mine, theirs, tasks = pickle.loads(candidate.read_bytes()), pickle.loads(parent.read_bytes()), _tasks()
    means, rescored = {}, {}
    print("| task | side | items | rms error | shared part (length) | share of the error energy |")
    print("|---|---|---:|---:|---:|---:|")
    for name, result in mine.items():
        corrected = {}
        for side, rows in result.embeddings.items():
            error = np.asarray(rows, np.float64) - np.asarray(theirs[name].embeddings[side], np.float64)
            mean = error.mean(axis=0)
            energy = float((error**2).sum(axis=1).mean())
            means[f"{name}/{side}"] = mean
            corrected[side] = _unit(np.asarray(rows, np.float64) - mean).astype(np.float32)
            print(
                f"| {name} | {side} | {len(error)} | {np.sqrt(energy):.4f} | {np.linalg.norm(mean):.4f} | "
                f"{float(mean @ mean) / max(energy, 1e-30):.0%} |"
            )
        rescored[name] = score_task(tasks[name], corrected)
    names = list(means)
    print("\ncosine between the sides' shared parts:")
    for a in names:
        row = [float(means[a] @ means[b] / (np.linalg.norm(means[a]) * np.linalg.norm(means[b]))) for b in names]
        print(f"  {a}: " + " ".join(f"{value:+.2f}" for value in row))
    before = _count(mine, theirs)
    after = _count(rescored, theirs)
    for label, (agree, items, first_agree, first_items) in (("as embedded", before), ("shared parts removed", after)):
        print(
            f"{label}: {agree}/{items} = {agree / max(items, 1):.1%} of every list; "
            f"{first_agree}/{first_items} = {first_agree / max(first_items, 1):.1%} of the first table's lists"
        )


def noise(parent: Path, sizes: list[float], draws: int, seed: int = 0) -> None:
    from pue.benchmarks.pmeb.evaluate import score_task

    theirs, tasks = pickle.loads(parent.read_bytes()), _tasks()
    rng = np.random.default_rng(seed)
    print("| error rms | mean cosine (about) | every list: mean (5-95 %) | first table's lists: mean (5-95 %) |")
    print("|---:|---:|---|---|")
    for rms in sizes:
        every, first = [], []
        for _ in range(draws):
            rescored = {}
            for name, result in theirs.items():
                noisy = {}
                for side, rows in result.embeddings.items():
                    rows = np.asarray(rows, np.float64)
                    noisy[side] = _unit(rows + rng.standard_normal(rows.shape) * rms / np.sqrt(rows.shape[1]))
                rescored[name] = score_task(tasks[name], {k: v.astype(np.float32) for k, v in noisy.items()})
            agree, items, first_agree, first_items = _count(rescored, theirs)
            every.append(agree / items)
            first.append(first_agree / first_items)
        print(
            f"| {rms:g} | {1 - rms * rms / 2:.5f} | {np.mean(every):.1%} ({np.percentile(every, 5):.1%}-"
            f"{np.percentile(every, 95):.1%}) | {np.mean(first):.1%} ({np.percentile(first, 5):.1%}-"
            f"{np.percentile(first, 95):.1%}) |"
        )


if __name__ == "__main__":
    command, arguments = sys.argv[1:2], sys.argv[2:]
    if command == ["embed"] and len(arguments) in (2, 3):
        embed(arguments[0], Path(arguments[1]), *arguments[2:])
    elif command == ["compare"] and len(arguments) == 2:
        compare(Path(arguments[0]), Path(arguments[1]))
    elif command == ["shared"] and len(arguments) == 2:
        shared(Path(arguments[0]), Path(arguments[1]))
    elif command == ["noise"] and len(arguments) in (1, 2, 3):
        rms = [float(v) for v in (arguments[1] if len(arguments) > 1 else "0.01,0.02,0.038,0.06").split(",")]
        noise(Path(arguments[0]), rms, int(arguments[2]) if len(arguments) > 2 else 200)
    else:
        raise SystemExit(__doc__)
