"""Deriving a bundle from a parent: one path for every derived kind (INT8, INT8-dynamic, FP16, TensorRT engines).

    with derive_bundle(parent_dir, output, overwrite=overwrite) as child:
        child.link_from_parent(child.parent.tokenizer.file.path)    # unchanged files: hard link where possible
        ... write graphs or engines into child.staging ...
        manifest = child.child_manifest(precision=..., target=..., backend=...)
        child.gate(report, "fidelity gate", details)                 # failed: OUT.gate-failed.json, exit 3
        child.commit(manifest, fidelity=report, files=["fidelity.json", ...])

The parent is read and its files verified first; the child is staged in a sibling temporary directory and renamed
into place only by a successful `commit` (a failed gate, an error or an interrupt leaves nothing, and an existing
output untouched); its manifest records the lineage (parent manifest sha256 and precision) and every file's hash.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pue.bundle import (
    FileEntry,
    Lineage,
    Manifest,
    atomic_directory,
    check_output_path,
    file_entry,
    manifest_sha256,
    read_manifest,
    resolve_inside,
    verify_files,
    write_manifest,
)
from pue.errors import PueError
from pue.fidelity import GateReport, fail_gate

log = logging.getLogger(__name__)


@dataclass
class Derivation:
    """A child bundle being staged from `parent` (read and verified) into `staging`."""

    parent_dir: Path
    parent: Manifest
    output: Path
    staging: Path
    linked: list[str] = field(default_factory=list)
    committed: bool = False

    def link_from_parent(self, relative: str) -> FileEntry:
        """Put the parent's file at the same place in the child: a hard link where the filesystem allows (an
        8 B FP32 graph is 32 GB), else a copy. Hash checks at load catch a parent file edited in place later."""
        source = resolve_inside(self.parent_dir, relative)
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(source, target)
            self.linked.append(relative)
        except OSError:  # another filesystem, or links not supported
            shutil.copyfile(source, target)
        return file_entry(self.staging, relative)

    def write_json(self, relative: str, data: Any) -> FileEntry:
        path = self.staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=float) + "\n")
        return file_entry(self.staging, relative)

    def child_manifest(self, precision: str | None = None, target: str | None = None) -> Manifest:
        """The parent's manifest as the child's starting point: lineage set, extra files and fidelity cleared."""
        manifest = Manifest.from_dict(self.parent.to_dict())
        manifest.precision = precision or self.parent.precision
        manifest.target = target or self.parent.target
        manifest.files, manifest.fidelity = {}, {}
        manifest.lineage = Lineage(
            parent_sha256=manifest_sha256(self.parent_dir),
            parent_precision=self.parent.precision,
            calibration=self.parent.lineage.calibration,
        )
        return manifest

    def gate(
        self,
        report: GateReport,
        headline: str,
        details: dict[str, Any] | None = None,
        reasons: Sequence[str] | None = None,
    ) -> None:
        """Nothing more happens after a failed gate: its measurements go to `OUT.gate-failed.json`, a
        GateFailedError (exit 3) is raised and the staged child is removed."""
        if not report.passed:
            fail_gate(self.output, headline, report, {"parent": str(self.parent_dir), **(details or {})}, reasons)

    def commit(self, manifest: Manifest, files: Sequence[str] = ()) -> Manifest:
        """Record `files` (written in staging) with their hashes and write the manifest; the rename into place
        happens when the `derive_bundle` block ends without an error."""
        for relative in files:
            manifest.files[relative] = file_entry(self.staging, relative)
        verify_files(self.staging, manifest)
        write_manifest(self.staging, manifest)
        self.committed = True
        return manifest


@contextlib.contextmanager
def derive_bundle(parent: str | Path, output: str | Path, overwrite: bool = False) -> Iterator[Derivation]:
    """Read and verify the parent, stage the child atomically; the block must end with `Derivation.commit`."""
    parent_dir, output = Path(parent), Path(output)
    parent_manifest = read_manifest(parent_dir)
    verify_files(parent_dir, parent_manifest)
    check_output_path(output, overwrite)
    with atomic_directory(output, overwrite=overwrite) as staging:
        derivation = Derivation(parent_dir, parent_manifest, output, staging)
        yield derivation
        if not derivation.committed:
            raise PueError(f"internal: the derived bundle {output} was never committed")  # a bug, not user input
    if derivation.linked:
        log.info("%s: %d unchanged file(s) hard-linked from the parent", output, len(derivation.linked))
