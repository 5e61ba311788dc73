"""Backends by name, each with what it runs: `Embedder.load` asks here which backend opens a bundle.

A backend registers a `BackendSpec`: the kinds of bundle it reads (a manifest's `backend`: "onnxruntime" for ONNX
graphs, "tensorrt" for engines), the precisions, targets and devices it runs, the pip extra that installs it per
device, the options it takes, and a factory `(bundle_dir, manifest, device, **options) -> Backend`, named as
"module:attribute" so that nothing is imported until the backend is chosen. `open_backend` refuses a bundle no
backend can run with the reason and the backends that could (and their extras), passes options through, and with
`backend="auto"` tries the capable backends in order (the bundle's own first), moving on when one is not installed.

Adding a backend: write its module (a `Backend` subclass, see `base`), then add one `BackendSpec` to `BUILTIN`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pue.bundle import Manifest
from pue.choices import Attention, BundleTarget, DeviceKind, Precision
from pue.errors import BundleError, MissingDependencyError, PueError
from pue.precisions import DEVICE_NAMES, PrecisionSpec, bundle_spec
from pue.runtime.backends.base import Backend, Device, parse_device

AUTO = "auto"


@dataclass(frozen=True)
class BackendSpec:
    """A backend and what it can run."""

    name: str
    factory: str | Callable[..., Backend]  # "module:attribute", imported when chosen, or the callable itself
    reads: tuple[str, ...]  # bundle kinds it loads, as a manifest's `backend` names them
    holds: str  # what a bundle of its own kind holds, for messages ("TensorRT engines")
    precisions: tuple[Precision, ...]
    targets: tuple[BundleTarget, ...]
    devices: tuple[DeviceKind, ...]
    extras: dict[DeviceKind, str]  # the pip extra that installs it, per device
    options: tuple[str, ...] = ()  # keyword options the factory takes, passed through from `Embedder.load`
    make_hint: str = ""  # how to get a bundle it reads from another one; "{bundle}" is filled in
    device_hint: str = ""  # what to do when a device it does not run on was asked for
    # attention layouts of the graphs it runs (a manifest's export.quantization.attention.mode; root graphs: standard)
    attention: tuple[Attention, ...] = (Attention.STANDARD, Attention.FUSED)
    attention_hint: str = ""  # why it does not run the other layouts, said when it refuses one
    description: str = field(default="", compare=False)

    def refusal(self, bundle_dir: Path, manifest: Manifest, spec: PrecisionSpec, device: Device) -> PueError | None:
        """Why this backend cannot run the bundle on `device` (an error to raise), or None when it can."""
        if manifest.backend not in self.reads:
            return PueError(
                f"bundle {bundle_dir} holds {_holds(manifest.backend)}, not {self.holds}",
                self.make_hint.format(bundle=bundle_dir) or None,
            )
        if spec.precision not in self.precisions:
            return PueError(
                f"backend '{self.name}' does not run {spec.precision} bundles (it runs {_listing(self.precisions)})"
            )
        if manifest.target not in self.targets and spec.target not in self.targets:  # any-target graphs serve all
            return PueError(
                f"backend '{self.name}' does not run graphs made for target '{manifest.target}' "
                f"(it runs graphs for {_listing(self.targets)})"
            )
        layout = bundle_attention(manifest)
        if layout not in self.attention:
            return PueError(
                f"backend '{self.name}' does not run {layout}-attention graphs (bundle {bundle_dir}, "
                f"{spec.precision} for {manifest.target}){': ' + self.attention_hint if self.attention_hint else ''}",
                "load it with backend='onnxruntime', or quantize the fp32 parent again with --attention standard",
            )
        if device.kind not in self.devices:
            where = " or ".join(DEVICE_NAMES[kind] for kind in self.devices)
            what = f"bundle {bundle_dir} holds {self.holds}, which" if manifest.backend == self.name else "it"
            return PueError(
                f"{what} run on {where} only; device {str(device)!r} was asked for", self.device_hint or None
            )
        return None

    def extra_for(self, device: Device) -> str:
        return self.extras.get(device.kind) or next(iter(self.extras.values()))

    def load_factory(self) -> Callable[..., Backend]:
        if callable(self.factory):
            return self.factory
        module, _, attribute = self.factory.partition(":")
        return getattr(importlib.import_module(module), attribute)


def bundle_attention(manifest: Manifest) -> Attention:
    """The attention layout of the bundle's graphs: what quantization wrote (export.quantization.attention.mode),
    else standard (root graphs and engines' sources use standard ONNX attention)."""
    quantization = manifest.export.quantization
    mode = (quantization.attention or {}).get("mode") if quantization is not None else None
    return Attention(mode) if mode in Attention.values() else Attention.STANDARD


_ONNX_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT8_DYNAMIC)

BUILTIN: tuple[BackendSpec, ...] = (
    BackendSpec(
        name="onnxruntime",
        factory="pue.runtime.backends.onnxruntime:OnnxRuntimeBackend",
        reads=("onnxruntime",),
        holds="ONNX graphs",
        precisions=_ONNX_PRECISIONS,
        targets=(BundleTarget.ANY, BundleTarget.ONNXRUNTIME, BundleTarget.TENSORRT),
        devices=(DeviceKind.CPU, DeviceKind.CUDA),
        extras={DeviceKind.CPU: "cpu", DeviceKind.CUDA: "gpu"},
        options=(
            "threads",
            "use_io_binding",
            "gpu_provider",
            "session_options",
            "session_config",
            "profile_dir",
        ),
        make_hint="load the ONNX bundle it was built from (its manifest's lineage names it)",
        description="ONNX graphs in onnxruntime sessions, on CPU or CUDA",
    ),
    BackendSpec(
        name="tensorrt",
        factory="pue.runtime.backends.tensorrt:TensorRTBackend",
        reads=("tensorrt",),
        holds="TensorRT engines",
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8),
        targets=(BundleTarget.TENSORRT,),
        devices=(DeviceKind.CUDA,),
        extras={DeviceKind.CUDA: "tensorrt"},
        make_hint="build engines with: pue-export trt {bundle} -o ENGINE_BUNDLE",
        device_hint="use device='cuda' (or 'cuda:N'), or load the parent ONNX bundle with backend='onnxruntime' on CPU",
        description="TensorRT engines built by `pue-export trt`, on CUDA",
    ),
    BackendSpec(
        name="openvino",
        factory="pue.runtime.backends.openvino:OpenVinoBackend",
        reads=("onnxruntime", "openvino"),  # ONNX graphs; "openvino" bundles: bf16, or Q/DQ gated in OpenVINO
        holds="ONNX graphs for OpenVINO (bf16 inference, or INT8 gated in OpenVINO)",
        precisions=(
            Precision.FP32,
            Precision.FP16,
            Precision.INT8,
            Precision.INT8_DYNAMIC,
            Precision.BF16,
            Precision.INT8_BF16,
            Precision.INT8_DYNAMIC_BF16,
        ),
        targets=(BundleTarget.ANY, BundleTarget.ONNXRUNTIME, BundleTarget.TENSORRT, BundleTarget.OPENVINO),
        devices=(DeviceKind.CPU,),
        extras={DeviceKind.CPU: "openvino"},
        options=("threads", "cache_dir", "perf_counters"),
        make_hint="load its fp32 parent (its manifest's lineage names it)",
        device_hint="use device='cpu'; on CUDA, use backend='onnxruntime' or TensorRT engines of the fp32 parent",
        attention=(Attention.STANDARD,),
        attention_hint=(
            "the onnxruntime-target INT8 graphs fuse attention into onnxruntime-only contrib ops "
            "(com.microsoft MultiHeadAttention, GroupQueryAttention), which OpenVINO does not read"
        ),
        description=(
            "ONNX graphs compiled by OpenVINO's CPU plugin (fp32, fp16, standard-attention INT8, bf16, int8-bf16, "
            "int8-dynamic, int8-dynamic-bf16)"
        ),
    ),
)

_REGISTRY: dict[str, BackendSpec] = {spec.name: spec for spec in BUILTIN}


def register(spec: BackendSpec, replace: bool = False) -> BackendSpec:
    """Add a backend (tests and plug-ins; built-in ones are listed in `BUILTIN`)."""
    if spec.name == AUTO:
        raise PueError(f"'{AUTO}' is not a backend name; it asks the registry to choose")
    if spec.name in _REGISTRY and not replace:
        raise PueError(f"a backend named '{spec.name}' is already registered", "pass replace=True to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> tuple[BackendSpec, ...]:
    """Every registered backend, built-in ones first."""
    return tuple(_REGISTRY.values())


def backend_spec(name: str) -> BackendSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PueError(f"unknown backend '{name}'", f"choose one of: {', '.join([AUTO, *_REGISTRY])}") from None


def capable(bundle_dir: Path, manifest: Manifest, device: str | Device) -> list[BackendSpec]:
    """The registered backends that can run this bundle on `device`, the bundle's own kind first."""
    spec, parsed = bundle_spec(manifest.precision, manifest.target), parse_device(device)
    able = [b for b in registered() if b.refusal(bundle_dir, manifest, spec, parsed) is None]
    return sorted(able, key=lambda b: b.name != manifest.backend)


def choose(bundle_dir: Path, manifest: Manifest, backend: str, device: str | Device) -> list[BackendSpec]:
    """The backends to try in order: `[backend]` when named, else every capable one; refusals explain themselves."""
    spec, parsed = bundle_spec(manifest.precision, manifest.target), parse_device(device)
    if backend != AUTO:
        backend_spec(backend)  # an unknown name is refused first, with the registered ones
    if not any(manifest.backend in b.reads for b in registered()):
        raise BundleError(
            f"bundle {bundle_dir} is a '{manifest.backend}' bundle, which no registered backend reads "
            f"(registered: {', '.join(_REGISTRY)})",
            "a newer pue may have written it: install the pue that did",
        )
    spec.check_device(parsed)
    able = capable(bundle_dir, manifest, parsed)
    if backend == AUTO:
        if able:
            return able
        readers = [b for b in registered() if manifest.backend in b.reads]
        raise _with_alternatives(readers[0].refusal(bundle_dir, manifest, spec, parsed), [], parsed)
    chosen = backend_spec(backend)
    refusal = chosen.refusal(bundle_dir, manifest, spec, parsed)
    if refusal is not None:
        raise _with_alternatives(refusal, able, parsed)
    return [chosen]


def open_backend(
    bundle_dir: str | Path,
    manifest: Manifest,
    backend: str = AUTO,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> tuple[BackendSpec, Backend]:
    """Open the bundle with `backend` (or the first capable one that is installed) and `options` passed through.

    `threads` goes to backends that take a `threads` option and is ignored by the others (GPU-only backends).
    """
    bundle_dir = Path(bundle_dir)
    candidates = choose(bundle_dir, manifest, backend, device)
    missing: list[tuple[BackendSpec, MissingDependencyError]] = []
    for candidate in candidates:
        given = dict(options or {})
        unknown = sorted(set(given) - set(candidate.options))
        if unknown:
            raise PueError(
                f"backend '{candidate.name}' takes no option {', '.join(map(repr, unknown))}",
                f"its options: {', '.join(candidate.options) or 'none'}",
            )
        if threads is not None and "threads" in candidate.options:
            given.setdefault("threads", threads)
        try:
            return candidate, candidate.load_factory()(bundle_dir, manifest, device=device, **given)
        except MissingDependencyError as exc:
            missing.append((candidate, exc))
    if len(missing) == 1:
        raise missing[0][1]
    raise NoBackendInstalled(missing, parse_device(device))


class NoBackendInstalled(MissingDependencyError):
    """Several backends could run the bundle and none of them is installed."""

    def __init__(self, missing: list[tuple[BackendSpec, MissingDependencyError]], device: Device) -> None:
        self.package = ", ".join(exc.package for _, exc in missing)
        self.extra = missing[0][0].extra_for(device)
        installs = " or ".join(f'pip install "pue[{spec.extra_for(device)}]" ({spec.name})' for spec, _ in missing)
        PueError.__init__(
            self,
            f"no backend that runs this bundle on {device} is installed "
            f"({'; '.join(exc.message for _, exc in missing)})",
            f"install one: {installs}",
        )


def _with_alternatives(refusal: PueError | None, able: list[BackendSpec], device: Device) -> PueError:
    assert refusal is not None  # only called for a backend that refused
    if not able:
        return refusal
    others = ", ".join(f'{b.name} (pip install "pue[{b.extra_for(device)}]")' for b in able)
    hint = f"backends that run it on {device}: {others}"
    return type(refusal)(refusal.message, f"{refusal.hint}; {hint}" if refusal.hint else hint)


def _holds(kind: str) -> str:
    """What a bundle of this kind holds, as the backend of that name (else the first that reads it) says."""
    readers = [b for b in registered() if kind in b.reads]
    own = _REGISTRY.get(kind) or (readers[0] if readers else None)
    return own.holds if own is not None else f"'{kind}' files"


def _listing(values: tuple[str, ...]) -> str:
    return ", ".join(str(value) for value in values)
