"""Stand-ins for `tensorrt` and cuda-python (`cuda.bindings.runtime`) that run on CPU (bundles: tests/tiny_bundle.py).

The fake CUDA runtime (tests/cuda_fakes.py) hands out host memory as "device" memory and checks every pointer a copy
touches lies in an allocation. The fake TensorRT follows the documented Python API (Builder, strongly typed networks,
OnnxParser, profiles, timing caches, Runtime, engines, execution contexts); its "engine" runs the source ONNX graph
with onnxruntime, reading inputs from and writing outputs to the addresses `set_tensor_address` gave it. So the real
backend and build code run end to end here, with real numbers. Not a model of TensorRT's numerics.
"""

from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
from cuda_fakes import FakeCudart

__all__ = ["FakeCudart", "hide", "install", "make_fake_tensorrt"]

# --- fake tensorrt ---------------------------------------------------------------------------------------------

PLAN_MAGIC = b"FAKEPLAN"
ORT_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


def make_fake_tensorrt(
    cudart: FakeCudart, version: str = "10.14.1.48", noise: float = 0.0, fail_build: bool = False, parse_ok: bool = True
) -> types.ModuleType:
    """A `tensorrt` module whose engines run the ONNX graph in onnxruntime on `cudart`'s memory.

    `noise` adds Gaussian noise of that scale to float outputs (to fail a gate); `record` collects what the code
    under test asked for (network flags, profiles, builder flags, timing caches).
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.record = {
        "network_flags": [],
        "profiles": [],
        "flags": [],
        "pool_limits": [],
        "hardware_levels": [],
        "timing_cache_in": [],
        "host_code_allowed": [],
        "built": 0,
        "progress_monitor": [],
    }

    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity
    trt.ILogger = ILogger

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    trt.IProgressMonitor = IProgressMonitor
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.BuilderFlag = enum.Enum("BuilderFlag", "VERSION_COMPATIBLE")
    trt.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", "NONE AMPERE_PLUS SAME_COMPUTE_CAPABILITY")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    DataType = enum.Enum("DataType", "FLOAT HALF INT64 INT32 BF16")
    trt.DataType = DataType

    def nptype(dtype):
        table = {
            DataType.FLOAT: np.float32,
            DataType.HALF: np.float16,
            DataType.INT64: np.int64,
            DataType.INT32: np.int32,
        }
        if dtype not in table:
            raise TypeError(f"no numpy type for {dtype}")
        return table[dtype]

    trt.nptype = nptype

    class Input:
        def __init__(self, name: str) -> None:
            self.name = name

    class Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[Input] = []
            self.onnx_path: str | None = None

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> Input:
            return self.inputs[index]

    class ParserError:
        def __str__(self) -> str:
            return "In node 3 (importFancyOp): UNSUPPORTED_NODE: no importer for op FancyOp"

    class OnnxParser:
        def __init__(self, network: Network, logger: Any) -> None:
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            import onnx

            if not parse_ok:
                self.num_errors = 1
                return False
            model = onnx.load(path, load_external_data=False)
            self.network.inputs = [Input(value.name) for value in model.graph.input]
            self.network.onnx_path = str(Path(path).resolve())
            return True

        def get_error(self, index: int) -> ParserError:
            return ParserError()

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data

    class Config:
        def __init__(self) -> None:
            self.profiles: list[Profile] = []
            self.flags: set = set()
            self.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE
            self.cache: TimingCache | None = None
            self.progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            trt.record["pool_limits"].append((pool.name, size))

        def set_flag(self, flag):
            self.flags.add(flag)
            trt.record["flags"].append(flag.name)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data == b"MISMATCH":
                return False
            trt.record["timing_cache_in"].append(cache.data)
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            trt.record["network_flags"].append(flags)
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config):
            assert network.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)), "not strongly typed"
            assert len(config.profiles) == 1, "one optimisation profile expected"
            profile = config.profiles[0].shapes
            assert sorted(profile) == sorted(i.name for i in network.inputs), "the profile misses inputs"
            trt.record["profiles"].append(profile)
            trt.record["hardware_levels"].append(config.hardware_compatibility_level.name)
            if config.progress_monitor is not None:
                monitor = config.progress_monitor
                monitor.phase_start("Building engine", None, 2)
                monitor.step_complete("Building engine", 0)
                monitor.phase_finish("Building engine")
                trt.record["progress_monitor"].append(True)
            if fail_build:
                self.logger.log(Severity.ERROR, "out of memory while building (fake)")
                return None
            if config.cache is not None:
                config.cache.data += b"|" + Path(network.onnx_path).name.encode()
            trt.record["built"] += 1
            plan = {
                "onnx": network.onnx_path,
                "profile": {k: [list(s) for s in v] for k, v in profile.items()},
                "version_compatible": trt.BuilderFlag.VERSION_COMPATIBLE in config.flags,
            }
            return PLAN_MAGIC + json.dumps(plan).encode()

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name, shape):
            low, _, high = self.engine.profile[name]
            shape = tuple(shape)
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name):
            if name in self.shapes:
                return self.shapes[name]
            batch = next(iter(self.shapes.values()))[0]
            return tuple(batch if not isinstance(d, int) else d for d in self.engine.ort_shapes[name])

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int), "stream must be passed as an int handle"
            engine = self.engine
            feed = {}
            for name in engine.input_names:
                feed[name] = cudart.read(self.addresses[name], self.shapes[name], engine.dtypes[name])
            results = engine.session.run(engine.output_names, feed)
            for name, value in zip(engine.output_names, results, strict=True):
                value = np.asarray(value)
                if noise and value.dtype.kind == "f":
                    rng = np.random.default_rng(len(trt.record["profiles"]) + value.size)
                    value = (value + noise * rng.standard_normal(value.shape)).astype(value.dtype)
                assert tuple(value.shape) == self.get_tensor_shape(name), "output shape disagrees"
                cudart.write(self.addresses[name], value)
            return True

    class Engine:
        def __init__(self, plan: dict) -> None:
            import onnxruntime

            self.session = onnxruntime.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            self.profile = {k: tuple(tuple(s) for s in v) for k, v in plan["profile"].items()}
            self.input_names = [arg.name for arg in self.session.get_inputs()]
            self.output_names = [arg.name for arg in self.session.get_outputs()]
            args = {arg.name: arg for arg in [*self.session.get_inputs(), *self.session.get_outputs()]}
            self.ort_shapes = {name: list(arg.shape) for name, arg in args.items()}
            self.trt_types = {name: getattr(DataType, ORT_TYPES[arg.type]) for name, arg in args.items()}
            self.dtypes = {name: np.dtype(nptype(t)) for name, t in self.trt_types.items()}
            self.names = self.input_names + self.output_names

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, index):
            return self.names[index]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.input_names else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.trt_types[name]

        def get_tensor_shape(self, name):
            return tuple(d if isinstance(d, int) else -1 for d in self.ort_shapes[name])

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            data = bytes(data)
            if not data.startswith(PLAN_MAGIC):
                self.logger.log(Severity.ERROR, "IRuntime::deserializeCudaEngine: magic tag does not match")
                return None
            plan = json.loads(data[len(PLAN_MAGIC) :])
            trt.record["host_code_allowed"].append(self.engine_host_code_allowed)
            if plan["version_compatible"] and not self.engine_host_code_allowed:
                self.logger.log(Severity.ERROR, "engine host code is not allowed")
                return None
            return Engine(plan)

    trt.Builder = Builder
    trt.OnnxParser = OnnxParser
    trt.Runtime = Runtime
    return trt


def install(monkeypatch: Any, cudart: FakeCudart | None = None, **tensorrt_options: Any) -> tuple[Any, FakeCudart]:
    """Put the fakes where `import tensorrt` and `from cuda.bindings import runtime` find them."""
    cudart = cudart or FakeCudart()
    trt = make_fake_tensorrt(cudart, **tensorrt_options)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return trt, cudart


def hide(monkeypatch: Any, *names: str) -> None:
    """Make `import name` fail as if the package were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
