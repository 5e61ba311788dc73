"""Architectures registered by `model_type`; an unknown name is refused with the list of known ones."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from pue.errors import CheckpointError

if TYPE_CHECKING:
    from pue.export.architectures.base import Architecture

_REGISTRY: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    _REGISTRY[architecture.model_type] = architecture
    return architecture


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_architecture(model_type: str) -> Architecture:
    _load_builtin()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise CheckpointError(
            f"model_type '{model_type}' is not supported",
            f"supported: {', '.join(sorted(_REGISTRY))}",
        ) from None


_INFRASTRUCTURE = {"base", "decoder", "registry", "pooled_layer", "qwen_vision"}


def _load_builtin() -> None:
    """Import every module of this package: each registers its architecture, so adding one is one new file."""
    import pue.export.architectures as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{package.__name__}.{module.name}")
