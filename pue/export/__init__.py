"""The torch side: architectures, the PyTorch reference, ONNX export with its parity gate, tiny checkpoints.

Light at import: heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pue.export.reference import ReferenceEmbedder

__all__ = ["ReferenceEmbedder"]


def __getattr__(name: str) -> Any:
    if name == "ReferenceEmbedder":
        from pue.export.reference import ReferenceEmbedder

        return ReferenceEmbedder
    raise AttributeError(name)
