"""Backends run a bundle's two graphs: the runner contract (`base`), the registry that picks a backend for a
bundle (`registry`: where a new backend is registered), and the onnxruntime and TensorRT implementations.

Importing this package imports no inference library; each backend imports its own when constructed.
"""

from pue.runtime.backends.base import Backend, Device, Runner, parse_device
from pue.runtime.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner
from pue.runtime.backends.registry import BackendSpec, register, registered, unregister

__all__ = [
    "Backend",
    "BackendSpec",
    "Device",
    "OnnxRuntimeBackend",
    "OnnxRuntimeRunner",
    "Runner",
    "parse_device",
    "register",
    "registered",
    "unregister",
]
