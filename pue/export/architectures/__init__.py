"""Architecture registry: one module per supported `model_type`."""

from pue.export.architectures.registry import get_architecture, register, supported_model_types

__all__ = ["get_architecture", "register", "supported_model_types"]
