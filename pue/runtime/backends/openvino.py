"""The OpenVINO backend: the bundle's ONNX graphs compiled by OpenVINO's CPU plugin, one compiled model per graph.

Three things it never leaves to OpenVINO's defaults:

- **Precision.** The CPU plugin computes in bf16 by default on CPUs that have it (AVX512-BF16, AMX). The inference
  precision is set from the bundle's precision entry every time (`f32` for fp32, fp16 and INT8 graphs, `bf16` for
  a bf16 bundle) and read back from the compiled model; a bf16 bundle on a CPU without bf16 is refused, never run
  in f32.
- **The compile cache** lives outside the bundle (bundles stay read-only and hash-verified), in a directory per
  manifest sha256 under `$PUE_OPENVINO_CACHE_DIR`, else `$XDG_CACHE_HOME/pue/openvino`, else
  `~/.cache/pue/openvino`; `cache_dir=` overrides it, `cache_dir=False` turns it off.
- **Telemetry.** Only OpenVINO's runtime (`openvino.Core`) is used, which sends nothing; the `openvino-telemetry`
  package its wheel depends on is used by OpenVINO's model-conversion tools (`convert_model`, `ovc`,
  `benchmark_app`), which pue never calls (tests/runtime/test_openvino_backend.py checks it). `opt_in_out --opt_out`
  turns those off machine-wide too.

openvino is imported inside functions, so `pue.runtime` loads without it.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pue.bundle import Manifest, TensorSpec, manifest_sha256, resolve_inside
from pue.errors import BundleError, MissingDependencyError, PueError
from pue.precisions import PrecisionSpec, bundle_spec
from pue.runtime.backends.base import Backend, Device, Runner, parse_device
from pue.runtime.backends.cpu_int8 import refuse_saturating_weights
from pue.runtime.cpu import physical_core_count

CACHE_ENV = "PUE_OPENVINO_CACHE_DIR"
CPU_DEVICE = "CPU"
# OpenVINO's element types for the compute types a precision entry names.
INFERENCE_TYPES = {"float32": "f32", "bfloat16": "bf16"}
# OpenVINO's CPU plugin names a kernel's precision at the end of its exec_type ("brgemm_avx2_I8", "jit_avx2_U8"). Data
# movement and masks run in I8 too (Reshape, Gather, Select): int8 *arithmetic* is an int8 kernel of these layer types.
INT8_EXEC_SUFFIXES = ("_I8", "_U8")
# FullyConnectedCompressed: a weight MatMul whose weights are int8 constants alone (`int8-dynamic` for OpenVINO); its
# activations are quantized at run time, which the counters do not name (they show the f32 brgemm kernel)
MATMUL_LAYERS = ("FullyConnected", "FullyConnectedCompressed", "Convolution", "MatMul")
COMPRESSED_LAYER = "FullyConnectedCompressed"


def int8_kernel(exec_type: str) -> bool:
    """Whether OpenVINO's kernel name (a performance counter's `exec_type`) says it ran in int8."""
    return str(exec_type).upper().endswith(INT8_EXEC_SUFFIXES)


BF16_CPUS = (
    "Intel Xeon with AMX (4th generation Xeon Scalable 'Sapphire Rapids' and later) or AVX512-BF16 (3rd generation "
    "'Cooper Lake'), or AMD Zen 4 / Zen 5 (AVX512-BF16)"
)


def import_openvino() -> ModuleType:
    """The openvino module, or a MissingDependencyError naming the extra that installs it."""
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError("openvino", "openvino", "the OpenVINO backend") from exc
    return openvino


def default_cache_dir() -> Path:
    """Where compiled models are cached: $PUE_OPENVINO_CACHE_DIR, else $XDG_CACHE_HOME/pue/openvino, else
    ~/.cache/pue/openvino."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pue" / "openvino"


def cache_dir_for(bundle_dir: Path, cache_dir: str | os.PathLike[str] | bool | None) -> Path | None:
    """The bundle's own cache directory (keyed by its manifest's sha256), or None when caching is off."""
    if cache_dir is False:
        return None
    root = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
    return root / manifest_sha256(bundle_dir)


def cpu_bf16_support(core: Any = None) -> bool:
    """Whether OpenVINO's CPU plugin has native bf16 on this CPU (its OPTIMIZATION_CAPABILITIES lists BF16)."""
    if core is None:
        core = import_openvino().Core()
    return "BF16" in list(core.get_property(CPU_DEVICE, "OPTIMIZATION_CAPABILITIES"))


def cpu_description(core: Any = None) -> dict[str, Any]:
    """The CPU as OpenVINO sees it: its name and optimisation capabilities (recorded with a bf16 gate)."""
    if core is None:
        core = import_openvino().Core()
    return {
        "name": str(core.get_property(CPU_DEVICE, "FULL_DEVICE_NAME")),
        "openvino_capabilities": [str(c) for c in core.get_property(CPU_DEVICE, "OPTIMIZATION_CAPABILITIES")],
    }


def refuse_without_bf16(core: Any = None, what: str = "this bf16 bundle") -> None:
    """Refuse bf16 inference on a CPU without native bf16: OpenVINO would compute in f32 and say nothing."""
    if not cpu_bf16_support(core):
        found = cpu_description(core)
        raise PueError(
            f"{what} needs native bf16 in the CPU; this CPU ({found['name']}) has none "
            f"(OpenVINO's capabilities: {', '.join(found['openvino_capabilities'])}), so OpenVINO would compute in f32",
            f"run it on a CPU with bf16: {BF16_CPUS}; here, load its fp32 parent bundle (its lineage names it)",
        )


def inference_type(spec: PrecisionSpec) -> str:
    """OpenVINO's element type name for the bundle's compute type ("f32" or "bf16")."""
    try:
        return INFERENCE_TYPES[spec.compute]
    except KeyError:
        raise PueError(f"OpenVINO has no inference precision for {spec.compute} ({spec.precision})") from None


def compile_config(
    spec: PrecisionSpec, threads: int | None, cache: Path | None, perf_counters: bool = False
) -> dict[str, Any]:
    """The compile properties: latency hint, one stream, threads, the precision from the bundle, its run-time
    activation quantization (`PrecisionSpec.dynamic_group`: pinned, 0 = off, since OpenVINO's default varies across
    versions and would quantize the activations of any graph holding int8-only weights), cache, counters."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PueError(f"threads must be a positive integer, got {threads!r}")
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads or physical_core_count()),
        "INFERENCE_PRECISION_HINT": inference_type(spec),
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": str(spec.dynamic_group),
        "PERF_COUNT": "YES" if perf_counters else "NO",
    }
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    return config


def _type_name(value: Any) -> str:
    """OpenVINO's short name of an element type ("f32", "bf16"), from a Type or its string."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


def _tensor_spec(port: Any, known: Collection[str] = ()) -> TensorSpec:
    """A port as the runner contract describes it. A compiled model's port may carry several tensor names (fused
    nodes keep theirs): the one the graph contract (the manifest) names is used."""
    names = set(port.get_names())
    name = next((candidate for candidate in known if candidate in names), None) or port.get_any_name()
    shape: list[int | str] = []
    for index, dim in enumerate(port.get_partial_shape()):
        shape.append(dim.get_length() if dim.is_static else f"dim{index}")
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return TensorSpec(name=name, dtype=dtype, shape=shape)


class OpenVinoRunner(Runner):
    """One ONNX graph compiled by OpenVINO for the CPU. `activate()` compiles it (or loads it from the cache)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: Mapping[str, Any],
        name: str | None = None,
        tensor_names: Collection[str] = (),
    ) -> None:
        self.path = Path(path)
        self.tensor_names = tuple(tensor_names)  # the graph's input and output names, as the manifest records them
        super().__init__(name or self.path.stem)
        self._ov = import_openvino()
        self.config = dict(config)
        self.compiled: Any = None
        self.request: Any = None

    def _activate(self) -> None:
        if not self.path.is_file():
            raise BundleError(f"graph '{self.path}' does not exist", "the bundle is incomplete; rebuild it")
        core = self._ov.Core()
        try:
            # A path, not a model object: with CACHE_DIR a second load skips reading and compiling the graph.
            compiled = core.compile_model(str(self.path), CPU_DEVICE, self.config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise PueError(
                f"OpenVINO could not compile '{self.path}' for the CPU: {str(exc).strip().splitlines()[0]}",
                "OpenVINO runs standard-ONNX graphs (fp32, fp16, --target tensorrt INT8, bf16); onnxruntime-only "
                "contrib ops (fused attention) it does not",
            ) from exc
        asked = self.config["INFERENCE_PRECISION_HINT"]
        got = _type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if got != asked:
            raise PueError(
                f"{self.name}: OpenVINO compiled in {got}, the bundle asks for {asked}",
                "this OpenVINO or CPU cannot run the bundle's precision; load its fp32 parent bundle",
            )
        group = str(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))
        if group != self.config["DYNAMIC_QUANTIZATION_GROUP_SIZE"]:
            raise PueError(
                f"{self.name}: OpenVINO compiled with run-time activation quantization groups of {group}, the bundle "
                f"asks for {self.config['DYNAMIC_QUANTIZATION_GROUP_SIZE']} (0: off)",
                "install the OpenVINO version the bundle was gated with (its manifest's pue_version and fidelity.json "
                "name it), or re-quantize its FP32 parent with this one",
            )
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._inputs = [_tensor_spec(port, self.tensor_names) for port in compiled.inputs]
        self._outputs = [_tensor_spec(port, self.tensor_names) for port in compiled.outputs]

    def _deactivate(self) -> None:
        self.request = None
        self.compiled = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({name: np.ascontiguousarray(value) for name, value in feed.items()})
        # The request reuses its output buffers: copy before the next call overwrites them.
        ports = zip(self._outputs, self.compiled.outputs, strict=True)
        return {spec.name: np.array(results[port]) for spec, port in ports}

    def profiling_data(self) -> list[dict[str, Any]]:
        """OpenVINO's per-layer performance counters of the last inference (needs `perf_counters=True`)."""
        self._require_active()
        if self.config.get("PERF_COUNT") != "YES":
            raise PueError(
                "OpenVINO's performance counters are off", "load the bundle with options={'perf_counters': True}"
            )
        return [
            {
                "node": info.node_name,
                "node_type": info.node_type,
                "exec_type": info.exec_type,
                "status": str(info.status).rsplit(".", 1)[-1],
                "real_time_us": info.real_time.total_seconds() * 1e6,
                "cpu_time_us": info.cpu_time.total_seconds() * 1e6,
            }
            for info in self.request.profiling_info
        ]


class OpenVinoBackend(Backend):
    """The bundle's vision and decoder graphs compiled by OpenVINO for the CPU, at the bundle's precision."""

    name = "openvino"

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        manifest: Manifest,
        device: str | Device = "cpu",
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | bool | None = None,
        perf_counters: bool = False,
    ) -> None:
        super().__init__(manifest)
        self.bundle_dir = Path(bundle_dir)
        self.device = parse_device(device)
        if self.device.is_cuda:
            raise PueError(
                f"the OpenVINO backend runs on the CPU only; device {str(self.device)!r} was asked for",
                "use device='cpu', or backend='onnxruntime' / 'tensorrt' on CUDA",
            )
        ov = import_openvino()
        self.spec = bundle_spec(manifest.precision, manifest.target)
        if inference_type(self.spec) == "bf16":
            refuse_without_bf16(ov.Core(), f"bundle {self.bundle_dir} ({manifest.precision})")
        quantization = manifest.export.quantization
        refuse_saturating_weights(self.spec, quantization.weights if quantization is not None else None)
        missing = [name for name in ("vision", "decoder") if name not in manifest.graphs]
        if missing:
            raise BundleError(
                f"the manifest names no {' or '.join(missing)} graph (it has {sorted(manifest.graphs)})",
                "this bundle has no ONNX graphs for OpenVINO; use the bundle it was built from",
            )
        self.cache_dir = cache_dir_for(self.bundle_dir, cache_dir)
        self.config = compile_config(self.spec, threads, self.cache_dir, perf_counters)
        self.vision, self.decoder = (self._runner(name) for name in ("vision", "decoder"))
        try:
            self.vision.activate()
            self.decoder.activate()
        except BaseException:
            self.close()
            raise

    def _runner(self, name: str) -> OpenVinoRunner:
        graph = self.manifest.graphs[name]
        names = [spec.name for spec in (*graph.inputs, *graph.outputs)]
        return OpenVinoRunner(resolve_inside(self.bundle_dir, graph.file.path), self.config, name, names)

    @property
    def inference_precision(self) -> str:
        """The precision OpenVINO computes in for this bundle ("f32" or "bf16"), as the compiled models report."""
        return str(self.config["INFERENCE_PRECISION_HINT"])

    def profiling_data(self) -> dict[str, list[dict[str, Any]]]:
        """Per-layer performance counters of each graph's last inference."""
        return {"vision": self.vision.profiling_data(), "decoder": self.decoder.profiling_data()}
