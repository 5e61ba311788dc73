"""Lean inference from a bundle: numpy, Pillow, tokenizers, onnxruntime or TensorRT — never torch."""

from pue.runtime.embedder import Embedder, Query

__all__ = ["Embedder", "Query"]
