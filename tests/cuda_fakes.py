"""A stand-in for cuda-python's runtime (`cuda.bindings.runtime`) that runs on CPU, for the TensorRT fakes
(tests/tensorrt_fakes.py): it hands out host memory as "device" memory and checks that every pointer a copy touches
lies in an allocation, returning errors as cuda-python's tuples do.
"""

from __future__ import annotations

import ctypes
import enum
import math
import types

import numpy as np


class CudaError(enum.Enum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidValue = 1
    cudaErrorNoDevice = 100


class MemcpyKind(enum.Enum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class FakeStream:
    def __int__(self) -> int:
        return 0x5EED


class FakeCudart:
    """`cuda.bindings.runtime`: error tuples, host memory posing as device memory (pointer-checked)."""

    cudaError_t = CudaError
    cudaMemcpyKind = MemcpyKind

    def __init__(
        self,
        gpus: int = 1,
        name: str = "NVIDIA H100 80GB HBM3",
        capability: tuple[int, int] = (9, 0),
        memory_limit: int = 1 << 34,
    ) -> None:
        self.gpus = gpus
        self.name = name
        self.capability = capability
        self.memory_limit = memory_limit
        self.allocations: dict[int, np.ndarray] = {}
        self.malloc_count = 0
        self.copies: list[tuple[str, int]] = []

    ok = CudaError.cudaSuccess

    def cudaGetDeviceCount(self):
        return (CudaError.cudaErrorNoDevice, 0) if self.gpus == 0 else (self.ok, self.gpus)

    def cudaSetDevice(self, index):
        return (self.ok,) if index < self.gpus else (CudaError.cudaErrorInvalidValue,)

    def cudaGetDeviceProperties(self, index):
        props = types.SimpleNamespace(
            name=self.name.encode() + b"\0" * 8,
            major=self.capability[0],
            minor=self.capability[1],
            totalGlobalMem=80 << 30,
        )
        return self.ok, props

    def cudaRuntimeGetVersion(self):
        return self.ok, 12080

    def cudaDriverGetVersion(self):
        return self.ok, 13000

    def cudaGetErrorString(self, error):
        return self.ok, f"fake {error.name}".encode()

    def cudaStreamCreate(self):
        return self.ok, FakeStream()

    def cudaStreamSynchronize(self, stream):
        return (self.ok,)

    def cudaStreamDestroy(self, stream):
        return (self.ok,)

    def cudaMalloc(self, nbytes):
        if sum(a.nbytes for a in self.allocations.values()) + nbytes > self.memory_limit:
            return CudaError.cudaErrorMemoryAllocation, 0
        block = np.zeros(nbytes, dtype=np.uint8)
        self.allocations[block.ctypes.data] = block
        self.malloc_count += 1
        return self.ok, block.ctypes.data

    def cudaFree(self, ptr):
        if self.allocations.pop(ptr, None) is None:
            return (CudaError.cudaErrorInvalidValue,)
        return (self.ok,)

    def check_device(self, ptr: int, nbytes: int) -> None:
        for start, block in self.allocations.items():
            if start <= ptr and ptr + nbytes <= start + block.nbytes:
                return
        raise AssertionError(f"{nbytes} bytes at {ptr:#x} lie outside every device allocation")

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if kind is MemcpyKind.cudaMemcpyHostToDevice:
            self.check_device(dst, count)
        elif kind is MemcpyKind.cudaMemcpyDeviceToHost:
            self.check_device(src, count)
        else:
            self.check_device(dst, count)
            self.check_device(src, count)
        ctypes.memmove(dst, src, count)
        self.copies.append((kind.name, count))
        return (self.ok,)

    def cudaMemsetAsync(self, ptr, value, count, stream):
        self.check_device(ptr, count)
        ctypes.memset(ptr, value, count)
        return (self.ok,)

    def read(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        self.check_device(ptr, nbytes)
        raw = (ctypes.c_char * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.check_device(ptr, array.nbytes)
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)
