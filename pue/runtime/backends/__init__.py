"""Backends run a bundle's two graphs: the runner contract (`base`) and its onnxruntime implementation.

Importing this package imports no inference library; each backend imports its own when constructed.
"""

from pue.runtime.backends.base import Backend, Device, Runner, parse_device
from pue.runtime.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner

__all__ = ["Backend", "Device", "OnnxRuntimeBackend", "OnnxRuntimeRunner", "Runner", "parse_device"]
