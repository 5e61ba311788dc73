"""PMEB-mini prediction agreement of a bundle with another bundle (its FP32 parent) rather than with the PyTorch
reference, scored with pue's own `evaluate_task`, `compare` and `disagreement_margins` (items counted as
`scripts/write_benchmarks.py` counts them: every prediction list of every task, HOMIE's included). Used for issue
22's `bench` measurement, where the PyTorch reference costs more than the bundles. Not run by CI.

    python scripts/pmeb_bundle_agreement.py embed BUNDLE OUT.pkl [BACKEND]  # every pmeb-mini task; BACKEND: auto
    python scripts/pmeb_bundle_agreement.py compare A.pkl PARENT.pkl  # A's predictions against PARENT's

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


if __name__ == "__main__":
    command, arguments = sys.argv[1:2], sys.argv[2:]
    if command == ["embed"] and len(arguments) in (2, 3):
        embed(arguments[0], Path(arguments[1]), *arguments[2:])
    elif command == ["compare"] and len(arguments) == 2:
        compare(Path(arguments[0]), Path(arguments[1]))
    else:
        raise SystemExit(__doc__)
