"""The onnxruntime backend: one `InferenceSession` per graph, on CPU or CUDA.

onnxruntime is imported inside functions, so `pue.runtime` loads without it. On CUDA the session's
providers are checked after creation, because onnxruntime-gpu silently falls back to CPU when a CUDA
library is missing, and the vision output stays on the GPU (IO binding) when every row carries an image.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pue.bundle import Manifest, TensorSpec, resolve_inside
from pue.errors import BundleError, MissingDependencyError, ProviderError, PueError
from pue.extras import package_versions
from pue.precisions import CPU_INT8_ADVICE
from pue.runtime.backends.base import (
    ATTENTION_MASK,
    INPUT_IDS,
    PIXEL_VALUES,
    SENTENCE_EMBEDDING,
    Backend,
    Device,
    FeedValue,
    Runner,
    check_feed,
    feature_inputs,
    parse_device,
)
from pue.runtime.backends.cpu_int8 import refuse_cpu_int8_on_cuda, refuse_saturating_int8, s8_qdq_in_float
from pue.runtime.cpu import physical_core_count

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
# On CUDA, onnxruntime runs the graphs with its CUDA provider, or (opt-in) its TensorRT provider in front of it:
# `gpu_provider="tensorrt"` on OnnxRuntimeBackend, or this environment variable set to "tensorrt".
GPU_PROVIDERS = ("cuda", "tensorrt")
GPU_PROVIDER_ENV = "PUE_ORT_GPU_PROVIDER"
# Where the TensorRT provider caches its engines and timing cache (else it rebuilds them for every session).
TENSORRT_CACHE_ENV = "PUE_ORT_TRT_CACHE_DIR"
CUDA_REQUIREMENTS_URL = "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements"

# onnxruntime's type strings for the numpy dtypes a pue graph uses.
ORT_TO_NUMPY = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

# Documented in onnxruntime_session_options_config_keys.h.
SESSION_CONFIG = {
    # Sequential execution never uses the inter-op pool: keep its threads from spinning.
    "session.inter_op.allow_spinning": "0",
    # Vision and decoder run back to back in two sessions: stop one session's intra-op threads spinning as
    # soon as its run returns, or they steal cores from the other session (and from preprocessing).
    "session.force_spinning_stop": "1",
    # Allocate the (multi-GB) weights exactly, not in arena chunks rounded up to the next power of two.
    "session.use_device_allocator_for_initializers": "1",
}

INT8_ON_CUDA_ADVICE = CPU_INT8_ADVICE


def import_onnxruntime(device: Device | None = None) -> ModuleType:
    """The onnxruntime module, or a MissingDependencyError naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError as exc:
        if device is not None and device.is_cuda:
            raise MissingDependencyError(
                "onnxruntime", "gpu", "the onnxruntime backend on CUDA (package onnxruntime-gpu)"
            ) from exc
        raise MissingDependencyError(
            "onnxruntime", "cpu", 'the onnxruntime backend (on a CUDA GPU install "pue[gpu]" instead, never both)'
        ) from exc
    return onnxruntime


def default_session_options(
    threads: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    config: Mapping[str, str] | None = None,
) -> Any:
    """Session options for latency on this machine: full graph optimisation, one thread per physical core.

    `overrides` then sets `SessionOptions` attributes (e.g. {"enable_profiling": True}); `config` adds session
    config entries (onnxruntime_session_options_config_keys.h), replacing pue's own where keys are equal.
    """
    ort = import_onnxruntime()
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise PueError(f"threads must be a positive integer, got {threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or physical_core_count()
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    # Errors only: node-placement notes on CUDA ("Memcpy nodes added") are expected; pue checks providers itself.
    options.log_severity_level = 3
    for key, value in {**SESSION_CONFIG, **(config or {})}.items():
        options.add_session_config_entry(key, str(value))
    for name, value in (overrides or {}).items():
        if name.startswith("_") or not hasattr(options, name) or callable(getattr(options, name)):
            known = sorted(n for n in dir(options) if not n.startswith("_") and not callable(getattr(options, n)))
            raise PueError(f"onnxruntime's SessionOptions has no setting {name!r}", f"its settings: {', '.join(known)}")
        try:
            setattr(options, name, value)
        except TypeError as exc:
            raise PueError(f"SessionOptions.{name} cannot be set to {value!r}: {exc}") from exc
    return options


def resolve_gpu_provider(gpu_provider: str | None = None) -> str:
    """ "cuda" or "tensorrt": the argument, else $PUE_ORT_GPU_PROVIDER, else "cuda"."""
    chosen = (gpu_provider or os.environ.get(GPU_PROVIDER_ENV) or "cuda").strip().lower()
    if chosen not in GPU_PROVIDERS:
        source = "gpu_provider" if gpu_provider else f"${GPU_PROVIDER_ENV}"
        raise PueError(f"{source} is {chosen!r}", f"choose one of: {', '.join(GPU_PROVIDERS)}")
    return chosen


def providers_for(device: str | Device, gpu_provider: str | None = None) -> list[str | tuple[str, dict[str, Any]]]:
    device = parse_device(device)
    if not device.is_cuda:
        if gpu_provider == "tensorrt":
            raise PueError(
                "onnxruntime's TensorRT provider runs on a CUDA GPU; device 'cpu' was asked for",
                'use device="cuda", or drop gpu_provider="tensorrt"',
            )
        return [CPU_PROVIDER]
    cuda = (CUDA_PROVIDER, {"device_id": device.index or 0})
    if resolve_gpu_provider(gpu_provider) == "cuda":
        return [cuda, CPU_PROVIDER]
    options: dict[str, Any] = {"device_id": device.index or 0}
    cache = os.environ.get(TENSORRT_CACHE_ENV)
    if cache:
        options.update(
            trt_engine_cache_enable=True,
            trt_engine_cache_path=cache,
            trt_timing_cache_enable=True,
            trt_timing_cache_path=cache,
        )
    # CUDA stays behind TensorRT for the nodes TensorRT does not take
    return [(TENSORRT_PROVIDER, options), cuda, CPU_PROVIDER]


def _provider_names(providers: list[str | tuple[str, dict[str, Any]]]) -> list[str]:
    return [provider if isinstance(provider, str) else provider[0] for provider in providers]


def _installed_onnxruntime_packages() -> list[str]:
    versions = package_versions(("onnxruntime", "onnxruntime-gpu"))
    return [f"{name} {version}" for name, version in versions.items()]


def check_providers(asked: list[str], got: list[str], available: list[str]) -> None:
    """Raise ProviderError when the session lacks a provider that was asked for (no silent CPU fallback)."""
    missing = [name for name in asked if name not in got]
    if not missing:
        return
    installed = ", ".join(_installed_onnxruntime_packages()) or "no onnxruntime distribution found"
    message = (
        f"asked onnxruntime for {asked}, the session got {got}; "
        f"onnxruntime.get_available_providers() is {available} (installed: {installed})"
    )
    if CUDA_PROVIDER in missing and CUDA_PROVIDER not in available:
        hint = (
            "this onnxruntime has no CUDA provider: the CPU package is installed, or both packages are and the CPU "
            'one hides the GPU one; run `pip uninstall -y onnxruntime onnxruntime-gpu`, then `pip install "pue[gpu]"` '
            '(never together with "pue[cpu]"), or use device="cpu"'
        )
    elif CUDA_PROVIDER in missing:
        hint = (
            "onnxruntime-gpu is installed but could not start CUDA: a CUDA or cuDNN library it needs (e.g. "
            f"libcublasLt, libcudnn) is missing or of another major version; see {CUDA_REQUIREMENTS_URL} "
            '(onnxruntime.preload_dlls() loads them from pip\'s nvidia-* packages), or use device="cpu"'
        )
    elif TENSORRT_PROVIDER in missing:
        hint = (
            "onnxruntime-gpu could not start its TensorRT provider: TensorRT's libraries (libnvinfer, of the major "
            "version this onnxruntime was built for) are missing or do not load; install them (e.g. "
            '`pip install "pue[tensorrt]"`), or use the CUDA provider (gpu_provider="cuda"), or build engines with '
            "`pue-export trt`"
        )
    else:
        hint = f"install an onnxruntime build that provides {missing}"
    raise ProviderError(message, hint)


def _tensor_spec(node_arg: Any) -> TensorSpec:
    dtype = ORT_TO_NUMPY.get(node_arg.type, node_arg.type)
    shape = [dim if isinstance(dim, int) else (dim or "?") for dim in node_arg.shape]
    return TensorSpec(name=node_arg.name, dtype=dtype, shape=shape)


class OnnxRuntimeRunner(Runner):
    """One ONNX graph in an onnxruntime session. The session is created by `activate()`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str | Device = "cpu",
        providers: list[str | tuple[str, dict[str, Any]]] | None = None,
        session_options: Any = None,
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        super().__init__(name or self.path.stem)
        self.device = parse_device(device)
        self._ort = import_onnxruntime(self.device)
        self.providers = providers if providers is not None else providers_for(self.device)
        self.session_options = session_options if session_options is not None else default_session_options(threads)
        self.session: Any = None

    def _activate(self) -> None:
        if not self.path.is_file():
            raise BundleError(f"graph '{self.path}' does not exist", "the bundle is incomplete; rebuild it")
        asked = _provider_names(self.providers)
        available = list(self._ort.get_available_providers())
        # Refuse before loading multi-GB weights when the provider cannot possibly be there.
        check_providers(asked, [name for name in asked if name in available], available)
        with warnings.catch_warnings():
            # onnxruntime warns and falls back on its own; check_providers below raises instead.
            warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)
            try:
                # A path, not bytes: external weights (*.onnx.data) are found next to the graph.
                session = self._ort.InferenceSession(
                    str(self.path), sess_options=self.session_options, providers=self.providers
                )
            except Exception as exc:  # onnxruntime raises its own pybind exception types
                raise PueError(
                    f"onnxruntime could not create a session for '{self.path}' on {self.device}: {exc}",
                    "check that the file is a graph written by pue-export and, on CUDA, that the GPU has room",
                ) from exc
        check_providers(asked, list(session.get_providers()), available)
        self.session = session
        self._inputs = [_tensor_spec(arg) for arg in session.get_inputs()]
        self._outputs = [_tensor_spec(arg) for arg in session.get_outputs()]

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [spec.name for spec in self._outputs]
        return dict(zip(names, self.session.run(names, feed), strict=True))

    def infer_bound(self, feed: dict[str, Any], device_outputs: Collection[str] = ()) -> dict[str, Any]:
        """Run through IO binding: numpy inputs are copied to the device, OrtValue inputs are used where they
        live; outputs named in `device_outputs` come back as OrtValues on this runner's device (no copy to the
        host), the others as numpy arrays. Checked and timed like `infer`."""
        self._require_active()
        check_feed(self.name, {name: self._describe(value) for name, value in feed.items()}, self._inputs)
        binding = self.session.io_binding()
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for spec in self._outputs:
            if spec.name in device_outputs:
                binding.bind_output(spec.name, self.device.kind, self.device.index or 0)
            else:
                binding.bind_output(spec.name, "cpu")
        start = time.perf_counter()
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        self._record_time(time.perf_counter() - start)
        values = binding.get_outputs()
        return {
            spec.name: value if spec.name in device_outputs else value.numpy()
            for spec, value in zip(self._outputs, values, strict=True)
        }

    @staticmethod
    def _describe(value: Any) -> FeedValue:
        if isinstance(value, np.ndarray):
            return FeedValue.of(value)
        if not hasattr(value, "data_type"):
            raise PueError(f"inputs must be numpy arrays or onnxruntime OrtValues, got {type(value).__name__}")
        dtype = ORT_TO_NUMPY.get(value.data_type())
        if dtype is None:
            raise PueError(f"unsupported OrtValue type {value.data_type()}")
        return FeedValue(np.dtype(dtype), tuple(value.shape()))


class OnnxRuntimeBackend(Backend):
    """The bundle's vision and decoder graphs in onnxruntime sessions, created (and checked) at construction.

    `use_io_binding` keeps the vision output on the device and binds it as the decoder's `image_features`
    when every row of a batch carries an image; it defaults to on for CUDA and off for CPU. On CUDA,
    `gpu_provider="tensorrt"` (or $PUE_ORT_GPU_PROVIDER=tensorrt) puts onnxruntime's TensorRT provider in front of
    CUDA; like CUDA, it must be in the session's providers or loading fails.

    `session_options` sets `SessionOptions` attributes over pue's defaults and `session_config` adds config
    entries (see `default_session_options`); `profile_dir` turns on onnxruntime's profiler, one file per graph in
    that directory (`end_profiling()` returns them).
    """

    name = "onnxruntime"

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        manifest: Manifest,
        device: str = "cpu",
        threads: int | None = None,
        use_io_binding: bool | None = None,
        gpu_provider: str | None = None,
        session_options: Mapping[str, Any] | None = None,
        session_config: Mapping[str, str] | None = None,
        profile_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(manifest)
        self.bundle_dir = Path(bundle_dir)
        self.device = parse_device(device)
        refuse_cpu_int8_on_cuda(manifest, self.device)
        refuse_saturating_int8(manifest, self.device)
        session_config = {**s8_qdq_in_float(manifest, self.device), **(session_config or {})}
        import_onnxruntime(self.device)
        missing = [name for name in ("vision", "decoder") if name not in manifest.graphs]
        if missing:
            raise BundleError(
                f"the manifest names no {' or '.join(missing)} graph (it has {sorted(manifest.graphs)})",
                "this bundle has no ONNX graphs for onnxruntime; use the bundle it was built from",
            )
        self.use_io_binding = self.device.is_cuda if use_io_binding is None else use_io_binding
        runners = {
            name: OnnxRuntimeRunner(
                resolve_inside(self.bundle_dir, manifest.graphs[name].file.path),
                self.device,
                providers=providers_for(self.device, gpu_provider),
                session_options=default_session_options(
                    threads, _profiled(session_options, profile_dir, name), session_config
                ),
                name=name,
            )
            for name in ("vision", "decoder")
        }
        self.vision = runners["vision"]
        self.decoder = runners["decoder"]
        try:
            self.vision.activate()
            self.decoder.activate()
        except BaseException:
            self.close()
            raise

    def end_profiling(self) -> dict[str, Path]:
        """Stop onnxruntime's profiler (`profile_dir`) and return each graph's profile file."""
        files = {}
        for runner in (self.vision, self.decoder):
            runner._require_active()
            if runner.session_options.enable_profiling:
                files[runner.name] = Path(runner.session.end_profiling())
        if not files:
            raise PueError("onnxruntime's profiler is off for this bundle", "load it with options={'profile_dir': DIR}")
        return files

    def _run_checked(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pixel_values: np.ndarray | None,
        image_rows: np.ndarray,
    ) -> np.ndarray:
        # one image per row, every row: the vision output is the decoder's image_features as it stands
        all_images = input_ids.shape[0] > 0 and np.array_equal(image_rows, np.arange(input_ids.shape[0]))
        if not (self.use_io_binding and all_images and self._features_stay_on_device()):
            return super()._run_checked(input_ids, attention_mask, pixel_values, image_rows)
        pixel_values = pixel_values.astype(self._input_dtype(self.vision, PIXEL_VALUES), copy=False)
        names = [spec.name for spec in feature_inputs(self.decoder.input_metadata())]
        features = self.vision.infer_bound({PIXEL_VALUES: pixel_values}, device_outputs=names)
        outputs = self.decoder.infer_bound(
            {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, **{name: features[name] for name in names}}
        )
        return np.asarray(outputs[SENTENCE_EMBEDDING], dtype=np.float32)

    def _features_stay_on_device(self) -> bool:
        """The vision outputs can be bound as they are only when their dtypes are the ones the decoder takes."""
        produced = {spec.name: spec.dtype for spec in self.vision.output_metadata()}
        wanted = feature_inputs(self.decoder.input_metadata())
        return all(spec.name in produced and np.dtype(produced[spec.name]) == np.dtype(spec.dtype) for spec in wanted)


def _profiled(
    overrides: Mapping[str, Any] | None, profile_dir: str | os.PathLike[str] | None, graph: str
) -> dict[str, Any]:
    """`overrides` plus, with a profile directory, onnxruntime's profiler on with a file prefix of this graph's own
    (two sessions started within a second would otherwise write the same file)."""
    settings = dict(overrides or {})
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        settings.update(enable_profiling=True, profile_file_prefix=str(Path(profile_dir) / graph))
    return settings
