"""A seeded, stratified selection of calibration patches across sources (`pue.calibration.sources`).

Each source gets an equal share capped by what it has (the rest goes to the sources with more left), drawn
with its own random stream spawned from one seed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from pue.calibration.sources import TRANSFORMS, Patch, PatchSource
from pue.errors import PueError
from pue.slides.tissue import TissueFilter

__all__ = ["sample_check_patches", "sample_patches"]


def sample_patches(
    sources: list[PatchSource],
    num_patches: int,
    seed: int = 0,
    minimum: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[Patch], dict[str, Any]]:
    """A seeded selection of `num_patches` patches, as equal a share per source as each can give.

    Sources that cannot fill their share give all they have and the rest comes from those with more.
    Returns the patches (grouped by source, each source's in its own order) and the summary calibration.json
    records. Asking for more than there is warns and uses all; fewer usable than `minimum` is a `PueError`.
    `progress(source name, done, total)` is called while sources are scanned.
    """
    if not sources:
        raise PueError("no calibration sources given")
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise PueError(f"the number of calibration patches must be a positive integer, got {num_patches!r}")
    available = []
    for source in sources:
        report = None if progress is None else (lambda done, total, name=source.name: progress(name, done, total))
        available.append(source.candidates(report))
    counts = [len(patches) for patches in available]
    total = sum(counts)
    unreadable = [(file, reason) for source in sources for file, reason in source.unreadable]
    if total < minimum:
        raise PueError(
            f"only {total} usable calibration patches, fewer than the minimum of {minimum} "
            f"({_per_source_text(sources, counts)}){_unreadable_text(unreadable)}",
            hint="add images or slides, or fix the unreadable files",
        )
    if num_patches > total:
        warnings.warn(
            f"{num_patches} calibration patches requested but only {total} are usable "
            f"({_per_source_text(sources, counts)}); using all {total}",
            UserWarning,
            stacklevel=2,
        )
    quotas = _quotas(counts, min(num_patches, total))
    streams = np.random.SeedSequence(seed).spawn(len(sources))
    chosen: list[Patch] = []
    for patches, quota, stream in zip(available, quotas, streams, strict=True):
        picks = np.random.default_rng(stream).choice(len(patches), size=quota, replace=False)
        chosen.extend(patches[i] for i in sorted(int(i) for i in picks))
    summary = {
        "seed": seed,
        "requested": num_patches,
        "used": len(chosen),
        "minimum": minimum,
        "sources": [
            {**source.describe(), "available": count, "used": quota}
            for source, count, quota in zip(sources, counts, quotas, strict=True)
        ],
        "unreadable": [{"file": file, "reason": reason} for file, reason in unreadable],
        "tissue_filter": _filter_of(sources).to_dict(),
    }
    return chosen, summary


def sample_check_patches(
    sources: list[PatchSource], chosen: list[Patch], count: int, seed: int = 0
) -> tuple[list[Patch], dict[str, Any]]:
    """`count` patches the calibration fit did not read, for the search's check: first the sources' other patches
    (the same stratified draw, its own random stream), then, where the sources have no more, the chosen patches
    turned or mirrored (`Patch.transform`, the seven symmetries of a square in turn).

    Checking on the patches the ranges and GPTQ were fitted to overstates how a candidate does on any other patch
    (measured: the same `llava_next gains-few` INT8 candidate had min cosine 0.9905 on its 64 fitted patches, 0.9725
    on 125 others of the same images and 0.9818 on the fitted ones turned; the held-out gate's 0.9781). Returns the
    patches and what calibration.json records of them.
    """
    if count <= 0 or not chosen:
        return [], {"requested": count, "unseen": 0, "transformed": 0}
    taken = {_key(patch) for patch in chosen}
    left = [[p for p in source.candidates() if _key(p) not in taken] for source in sources]
    quotas = _quotas([len(patches) for patches in left], count)
    streams = np.random.SeedSequence([seed, 1]).spawn(len(sources))
    check: list[Patch] = []
    for patches, quota, stream in zip(left, quotas, streams, strict=True):
        picks = np.random.default_rng(stream).choice(len(patches), size=quota, replace=False)
        check.extend(patches[i] for i in sorted(int(i) for i in picks))
    unseen = len(check)
    names = list(TRANSFORMS)
    for k in range(min(count - unseen, len(chosen) * len(names))):
        patch = chosen[k % len(chosen)]
        check.append(dataclasses.replace(patch, transform=names[(k // len(chosen)) % len(names)]))
    return check, {"requested": count, "unseen": unseen, "transformed": len(check) - unseen}


def _key(patch: Patch) -> tuple[Any, ...]:
    return tuple(patch.to_dict().values())


def _quotas(counts: list[int], wanted: int) -> list[int]:
    """Equal shares capped by what each source has; leftovers go to the sources with the most left."""
    quotas = [0] * len(counts)
    active = [i for i, count in enumerate(counts) if count > 0]
    remaining = wanted
    while remaining > 0 and active:
        share = remaining // len(active)
        if share == 0:
            for i in sorted(active, key=lambda i: (quotas[i] - counts[i], i))[:remaining]:
                quotas[i] += 1
            break
        for i in active:
            take = min(share, counts[i] - quotas[i])
            quotas[i] += take
            remaining -= take
        active = [i for i in active if quotas[i] < counts[i]]
    return quotas


def _filter_of(sources: list[PatchSource]) -> TissueFilter:
    for source in sources:
        found = getattr(source, "tissue_filter", None)
        if found is not None:
            return found
    return TissueFilter()


def _per_source_text(sources: list[PatchSource], counts: list[int]) -> str:
    parts = []
    for source, count in zip(sources, counts, strict=True):
        bad = len(source.unreadable)
        parts.append(f"{source.name}: {count} usable" + (f", {bad} unreadable" if bad else ""))
    return "; ".join(parts)


def _unreadable_text(unreadable: list[tuple[str, str]], shown: int = 10) -> str:
    if not unreadable:
        return ""
    named = "; ".join(f"{file} ({reason})" for file, reason in unreadable[:shown])
    more = f"; and {len(unreadable) - shown} more" if len(unreadable) > shown else ""
    return f". Unreadable files: {named}{more}"
