"""An in-process stand-in for the part of Ray the slide job's Ray engine uses (tasks, `ray.get`, nodes, a dataset
of rows with `map_batches` over functions and callable classes, `iter_batches`), so the driver's logic (claims,
batches, commits, resume) is tested without starting Ray. It runs everything eagerly in this process, batch by
batch in the rows' order, and constructs a callable class once per `map_batches`, as an actor pool of one does.
The real engine is tested against a real local Ray in test_ray_engine.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np


class FakeRayError(Exception):
    pass


class _Task:
    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def options(self, **_: Any) -> _Task:
        return self

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


class _Dataset:
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = batches

    def map_batches(self, fn: Any, batch_size: int = 1, fn_kwargs: dict | None = None,
                    fn_constructor_kwargs: dict | None = None, **_: Any) -> _Dataset:  # fmt: skip
        assert batch_size == 1
        call = fn(**(fn_constructor_kwargs or {})) if isinstance(fn, type) else fn
        return _Dataset([_as_numpy(call(batch, **(fn_kwargs or {}))) for batch in self.batches])

    def iter_batches(self, **_: Any) -> Iterator[dict[str, np.ndarray]]:
        yield from self.batches


def _as_numpy(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        key: value if isinstance(value, np.ndarray) else np.array(value, dtype=object) for key, value in batch.items()
    }


def _from_items(rows: list[dict[str, Any]], **_: Any) -> _Dataset:
    def column(value: Any) -> np.ndarray:
        return np.array([value], dtype=object) if isinstance(value, (bytes, str)) else np.array([value])

    return _Dataset([{key: column(value) for key, value in row.items()} for row in rows])


def fake_ray(cpus: int = 2) -> SimpleNamespace:
    """A module-like object with the attributes `pue.embed.ray_engine` reads."""
    context = SimpleNamespace(enable_progress_bars=True)
    return SimpleNamespace(
        is_initialized=lambda: True,
        shutdown=lambda: None,
        remote=lambda **_: _Task,
        get=lambda refs: refs,
        nodes=lambda: [{"Alive": True, "NodeID": "node-1", "NodeManagerAddress": "127.0.0.1"}],
        cluster_resources=lambda: {"CPU": float(cpus)},
        exceptions=SimpleNamespace(RayError=FakeRayError),
        util=SimpleNamespace(
            scheduling_strategies=SimpleNamespace(NodeAffinitySchedulingStrategy=lambda *a, **k: None)
        ),
        data=SimpleNamespace(
            from_items=_from_items,
            ActorPoolStrategy=lambda size: SimpleNamespace(size=size),
            DataContext=SimpleNamespace(get_current=lambda: context),
        ),
    )
