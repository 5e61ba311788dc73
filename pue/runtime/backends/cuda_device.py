"""CUDA memory and streams through cuda-python's runtime bindings (no pycuda, no torch).

cuda-python returns error tuples, `(cudaError_t, *results)`: every call goes through `cuda_call`, which turns a
failure into a PueError naming the call and CUDA's own error string.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from pue.errors import MissingDependencyError, PueError
from pue.runtime.backends.tensorrt_plan import grown_capacity, tensor_bytes

log = logging.getLogger(__name__)

NO_GPU_HINT = (
    "TensorRT engines are built and run on a CUDA GPU: run this on the GPU machine (check `nvidia-smi` and "
    "CUDA_VISIBLE_DEVICES), or use the parent ONNX bundle with backend='onnxruntime' on CPU"
)


def import_cudart() -> ModuleType:
    """cuda-python's runtime module, or a MissingDependencyError naming the `tensorrt` extra."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise MissingDependencyError("cuda-python", "tensorrt", "TensorRT (CUDA memory and streams)") from exc
    return cudart


def _error_text(cudart: ModuleType, error: Any) -> str:
    name = getattr(error, "name", str(error))
    try:
        described = cudart.cudaGetErrorString(error)
        text = described[1] if isinstance(described, tuple) else described
        text = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the error string is a courtesy; never mask the real error
        text = ""
    return f"{name}: {text}" if text else str(name)


def cuda_call(cudart: ModuleType, result: Any, what: str) -> Any:
    """Unpack a cuda-python result tuple; raise PueError when its error code is not cudaSuccess."""
    if not isinstance(result, tuple):
        result = (result,)
    error, values = result[0], result[1:]
    if error != cudart.cudaError_t.cudaSuccess:
        raise PueError(f"CUDA call {what} failed ({_error_text(cudart, error)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def handle(value: Any) -> int:
    """A stream or pointer object as the integer TensorRT's Python API takes."""
    try:
        return int(value)
    except TypeError:
        return int(value.getPtr())


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in device memory: where, what shape, what dtype. Outlives nothing: valid until its buffer is reused."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)

    def first_rows(self, rows: int) -> DeviceTensor:
        """A view of the first `rows` entries of axis 0 (same memory)."""
        return DeviceTensor(self.ptr, (rows, *self.shape[1:]), self.dtype)


class CudaDevice:
    """One GPU: its properties, a stream, and memory operations on that stream."""

    def __init__(self, cudart: ModuleType, index: int = 0) -> None:
        self.cudart = cudart
        self.index = index
        try:
            count = cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except PueError as exc:
            raise PueError(f"no CUDA GPU is usable here: {exc.message}", NO_GPU_HINT) from exc
        if not count:
            raise PueError("no CUDA GPU is visible (cudaGetDeviceCount returned 0)", NO_GPU_HINT)
        if index >= count:
            raise PueError(
                f"device cuda:{index} was asked for, this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})",
                "pick an existing GPU index",
            )
        cuda_call(cudart, cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
        self.properties = cuda_call(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        self.stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

    # --- what the GPU is --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        name = self.properties.name
        if isinstance(name, bytes):
            name = name.split(b"\0", 1)[0].decode(errors="replace")
        return str(name).strip()

    @property
    def compute_capability(self) -> tuple[int, int]:
        return int(self.properties.major), int(self.properties.minor)

    @property
    def total_memory(self) -> int:
        return int(getattr(self.properties, "totalGlobalMem", 0))

    def runtime_version(self) -> str:
        return _cuda_version(cuda_call(self.cudart, self.cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))

    def driver_version(self) -> str:
        return _cuda_version(cuda_call(self.cudart, self.cudart.cudaDriverGetVersion(), "cudaDriverGetVersion"))

    # --- memory on this device's stream -----------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        try:
            return int(cuda_call(self.cudart, self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)"))
        except PueError as exc:
            raise PueError(
                exc.message,
                f"the GPU has no room for {nbytes / 2**20:.0f} MiB more; use a smaller batch or free GPU memory",
            ) from exc

    def free(self, ptr: int) -> None:
        if ptr:
            cuda_call(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")

    def upload(self, ptr: int, array: np.ndarray) -> None:
        """Queue a host-to-device copy; `array` must stay alive (and unchanged) until `synchronize()`."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(
            self.cudart,
            self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream),
            "cudaMemcpyAsync(host to device)",
        )

    def download(self, tensor: DeviceTensor) -> np.ndarray:
        """Copy a device tensor to a new host array (synchronizes the stream)."""
        out = np.empty(tensor.shape, dtype=tensor.dtype)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(
            self.cudart,
            self.cudart.cudaMemcpyAsync(out.ctypes.data, tensor.ptr, out.nbytes, kind, self.stream),
            "cudaMemcpyAsync(device to host)",
        )
        self.synchronize()
        return out

    def copy(self, destination: int, source: int, nbytes: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        cuda_call(
            self.cudart,
            self.cudart.cudaMemcpyAsync(destination, source, nbytes, kind, self.stream),
            "cudaMemcpyAsync(device to device)",
        )

    def zero(self, ptr: int, nbytes: int) -> None:
        cuda_call(self.cudart, self.cudart.cudaMemsetAsync(ptr, 0, nbytes, self.stream), "cudaMemsetAsync")

    def synchronize(self) -> None:
        cuda_call(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.stream is not None:
            cuda_call(self.cudart, self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None


def _cuda_version(number: int) -> str:
    """CUDA's integer versions: 12080 -> "12.8"."""
    number = int(number)
    return f"{number // 1000}.{(number % 1000) // 10}"


class DeviceBuffer:
    """Grow-only device memory: reused across calls, reallocated (larger) only when a call needs more."""

    def __init__(self, device: CudaDevice, name: str) -> None:
        self.device = device
        self.name = name
        self.ptr = 0
        self.capacity = 0
        self.allocations = 0

    def reserve(self, nbytes: int) -> int:
        """A pointer to at least `nbytes` bytes (the contents are not kept when the buffer grows)."""
        if nbytes > self.capacity or not self.ptr:
            capacity = grown_capacity(self.capacity, max(nbytes, 1))
            self.release()
            self.ptr = self.device.malloc(capacity)
            self.capacity = capacity
            self.allocations += 1
            log.debug("device buffer %s grew to %d bytes", self.name, capacity)
        return self.ptr

    def release(self) -> None:
        if self.ptr:
            self.device.free(self.ptr)
        self.ptr = 0
        self.capacity = 0
