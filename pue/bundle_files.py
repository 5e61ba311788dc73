"""Files of a bundle on disk: hashing, names that must stay inside the bundle, and atomic writing.

A bundle is built in a sibling temporary directory and renamed into place only once everything was written, so a
failed or interrupted run never leaves half a bundle and never loses the user's earlier one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pue.errors import BundleError, OutputExistsError


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_inside(bundle_dir: str | os.PathLike[str], relative: str) -> Path:
    """The path of `relative` inside the bundle; refuses absolute names, `..` and links leading out."""
    root = Path(bundle_dir).resolve()
    if os.path.isabs(relative) or Path(relative).is_absolute():
        raise BundleError(f"manifest names the absolute path '{relative}'", "bundle files must lie inside the bundle")
    if ".." in Path(relative).parts:
        raise BundleError(f"manifest names '{relative}', which leaves the bundle directory", "refusing to read it")
    resolved = (root / relative).resolve()
    if root != resolved and root not in resolved.parents:
        raise BundleError(
            f"'{relative}' resolves to {resolved}, outside the bundle directory {root}",
            "a symlink points out of the bundle; refusing to read it",
        )
    return resolved


def check_output_path(output: str | os.PathLike[str], overwrite: bool) -> Path:
    out = Path(output)
    if out.exists() and not overwrite:
        raise OutputExistsError(str(out))
    if out.exists() and not out.is_dir():
        raise BundleError(f"output '{out}' exists and is not a directory", "choose another path")
    return out


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `output`, on any error it is removed.

    An existing `output` is only replaced at the very end, after everything was written, so an
    interrupted or failed run leaves the user's earlier results untouched.
    """
    out = check_output_path(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
