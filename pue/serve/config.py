"""The server's settings, and the two choices it derives from the bundle: batching policy and model name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pue.bundle import Manifest
from pue.precisions import lookup
from pue.serve.limits import Limits
from pue.serve.security import LOOPBACK_NAMES


@dataclass(frozen=True)
class ServeSettings:
    """Everything `create_app` needs besides the Embedder."""

    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 128
    limits: Limits = field(default_factory=Limits)
    allowed_hosts: frozenset[str] | None = frozenset(LOOPBACK_NAMES)  # None: any Host header
    per_request: bool = False
    access_log: bool = True

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError(
                f"max_batch and max_queue must be at least 1 and max_wait_ms at least 0, got "
                f"{self.max_batch}, {self.max_queue}, {self.max_wait_ms}"
            )


def batch_dependent(manifest: Manifest) -> bool:
    """Whether a row's vector depends on its batch companions: activation scales computed per run (int8-dynamic;
    `ci` preset: min cosine 0.99974 alone vs batched). Unknown precisions are treated as dependent (the safe side)."""
    spec = lookup(manifest.precision, manifest.target)
    return spec is None or (spec.qdq is not None and not spec.qdq.static)


def batching_policy(manifest: Manifest) -> tuple[bool, str]:
    """(per_request, a sentence for the start-up log) for this bundle's precision."""
    if batch_dependent(manifest):
        return True, (
            f"precision {manifest.precision}: a row's vector depends on its batch companions, so each request "
            "is its own batch (never mixed with other clients' rows); vectors equal Embedder.embed(that request)"
        )
    return False, (
        f"precision {manifest.precision}: rows of concurrent requests share batches; a row's vector does not "
        "depend on its companions: rows share a batch only with rows of the same prompt length"
    )


def default_model_name(manifest: Manifest, bundle_dir: Path) -> str:
    """`<source checkpoint>-<precision>`, e.g. `mllm4pue-int8`; the bundle directory's name if the source is unnamed."""
    source = Path(manifest.source_checkpoint.name or "").name or Path(bundle_dir).resolve().name
    return f"{source}-{manifest.precision}"
