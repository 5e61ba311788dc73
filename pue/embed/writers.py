"""One file per slide, in the layouts pathology pipelines read, written atomically and byte-reproducibly.

HDF5 (TRIDENT's layout): dataset `coords` int64 (N, 2), level-0 top-left `x, y`, whose attributes describe the
tiling (`patch_size`, `patch_size_level0`, `level0_magnification`, `target_magnification`, `overlap`,
`level0_width`, `level0_height`, and pue's `level0_mpp`, `patch_mpp`, `mpp_source`, …); dataset `features` (N, D)
float32 or float16 whose attributes name the encoder, its precision, the bundle's manifest sha256 and pue's version.
The root attribute `pue_job` (JSON) holds what a rerun compares to decide the slide is done. No timestamps are
stored (`track_times=False`): the same inputs give byte-identical files.

Parquet (`--format parquet`): one row per tile, `slide_id, x, y, embedding` (`fixed_size_list<float32, D>`), the
same attributes as JSON in the schema metadata (`pue_job`, `coords`, `features`).

Both are written to a hidden temporary name in the output folder, flushed to disk and renamed over the final
name; a killed process leaves at most a `.<name>.tmp-<host>-<pid>` file, never a partial file under a final name.
`read_slide_file` reads either back (`pue-embed search`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pue.errors import MissingDependencyError, PueError

__all__ = ["SlideFeatures", "atomic_output", "read_job_attribute", "read_slide_file", "temp_name", "write_slide_file"]


def temp_name(final: Path, host: str | None = None, pid: int | None = None) -> Path:
    return final.with_name(f".{final.name}.tmp-{host or socket.gethostname()}-{pid or os.getpid()}")


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """A temporary path beside `final`; renamed over it when the block ends without error, removed otherwise."""
    temporary = temp_name(final)
    temporary.unlink(missing_ok=True)
    try:
        yield temporary
        with temporary.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_slide_file(
    final: Path,
    fmt: str,
    slide_id: str,
    coords: np.ndarray,
    features: np.ndarray,
    coords_attrs: dict[str, Any],
    features_attrs: dict[str, Any],
    job: dict[str, Any],
) -> None:
    """Write one slide's coordinates and features atomically (HDF5 or parquet)."""
    coords = np.ascontiguousarray(coords, dtype=np.int64).reshape(-1, 2)
    if features.shape[0] != coords.shape[0]:
        raise PueError(f"internal: {features.shape[0]} feature rows for {coords.shape[0]} tiles of slide {slide_id}")
    with atomic_output(final) as temporary:
        if fmt == "h5":
            _write_h5(temporary, coords, features, coords_attrs, features_attrs, job)
        else:
            _write_parquet(temporary, slide_id, coords, features, coords_attrs, features_attrs, job)


def read_job_attribute(path: Path, fmt: str) -> dict[str, Any] | None:
    """The `pue_job` record of a finished output, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        if fmt == "h5":
            import h5py

            with h5py.File(path, "r") as handle:
                raw = handle.attrs.get("pue_job")
        else:
            import pyarrow.parquet as pq

            raw = (pq.read_schema(path).metadata or {}).get(b"pue_job")
        if raw is None:
            return None
        return json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (OSError, ValueError, KeyError):
        return None


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's features file, read back: rows in the file's order."""

    path: Path
    coords: np.ndarray  # int64 (N, 2), level-0 top-left x, y
    features: np.ndarray  # float32 (N, D), whatever dtype was stored
    coords_attrs: dict[str, Any]
    features_attrs: dict[str, Any]
    job: dict[str, Any]


def read_slide_file(path: Path) -> SlideFeatures:
    """A features file this job wrote (HDF5 or parquet, by its suffix), with its attributes."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            metadata = table.schema.metadata or {}
            coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1).astype(np.int64)
            embedding = table.column("embedding").combine_chunks()
            dim = embedding.type.list_size
            features = embedding.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            attrs = [json.loads(metadata.get(key, b"{}")) for key in (b"coords", b"features", b"pue_job")]
        else:
            import h5py

            with h5py.File(path, "r") as handle:
                coords, features = handle["coords"][:], handle["features"][:]
                attrs = [_plain_attrs(handle["coords"].attrs), _plain_attrs(handle["features"].attrs)]
                attrs.append(json.loads(handle.attrs.get("pue_job", "{}")))
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "h5py, pyarrow", "slides", f"reading {path.name}") from exc
    except (OSError, KeyError, ValueError) as exc:
        raise PueError(f"{path} is not a readable pue-embed features file ({type(exc).__name__}: {exc})") from exc
    return SlideFeatures(path, np.asarray(coords, np.int64).reshape(-1, 2), features.astype(np.float32), *attrs)


def _plain_attrs(attrs: Any) -> dict[str, Any]:
    """HDF5 attributes as plain Python values (numpy scalars → numbers, bytes → str)."""
    plain = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        plain[key] = value.item() if isinstance(value, np.generic) else value
    return plain


def _write_h5(
    path: Path,
    coords: np.ndarray,
    features: np.ndarray,
    coords_attrs: dict[str, Any],
    features_attrs: dict[str, Any],
    job: dict[str, Any],
) -> None:
    try:
        import h5py
    except ImportError as exc:
        raise MissingDependencyError("h5py", "slides", "writing HDF5 features") from exc
    with h5py.File(path, "w") as handle:
        handle.attrs["pue_job"] = json.dumps(job, sort_keys=True)
        coords_set = handle.create_dataset("coords", data=coords, track_times=False)
        _set_attrs(coords_set, coords_attrs)
        features_set = handle.create_dataset("features", data=features, track_times=False)
        _set_attrs(features_set, features_attrs)


def _set_attrs(dataset: Any, attrs: dict[str, Any]) -> None:
    for key in sorted(attrs):
        value = attrs[key]
        if value is None:
            continue  # HDF5 has no null; an absent attribute means unknown
        dataset.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value


def _write_parquet(
    path: Path,
    slide_id: str,
    coords: np.ndarray,
    features: np.ndarray,
    coords_attrs: dict[str, Any],
    features_attrs: dict[str, Any],
    job: dict[str, Any],
) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError("pyarrow", "slides", "writing parquet features") from exc
    rows, dim = features.shape
    values = pa.array(np.ascontiguousarray(features, dtype=np.float32).ravel(), type=pa.float32())
    table = pa.table(
        {
            "slide_id": pa.array([slide_id] * rows, type=pa.string()),
            "x": pa.array(coords[:, 0], type=pa.int64()),
            "y": pa.array(coords[:, 1], type=pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
        }
    )
    metadata = {
        b"pue_job": json.dumps(job, sort_keys=True).encode(),
        b"coords": json.dumps(coords_attrs, sort_keys=True).encode(),
        b"features": json.dumps(features_attrs, sort_keys=True).encode(),
    }
    pq.write_table(table.replace_schema_metadata(metadata), path)
