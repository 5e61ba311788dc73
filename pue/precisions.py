"""What each precision means for each target: one table of frozen entries, read by every package.

A bundle's manifest names a `precision` and a `target`; together they select one `PrecisionSpec`: what the graphs
hold (weights, activations, the Q/DQ flavour), whether making them needs calibration data, which attention layouts
they may use, which devices their kernels are meant for, and whether `pue-export trt` builds engines from them.
Values are validated here, once, where they enter (a command's options, a manifest read by a command or the
runtime); everything downstream reads the entry's fields instead of comparing strings.

Which backends run an entry is what each backend declares when it registers (`pue.runtime.backends.registry`),
so a new backend is one module and one registration, and a new precision or target is one entry here (plus its
name in `pue.choices`; tests/test_precisions.py checks that the two agree). Stdlib only: the runtime imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pue.choices import Attention, BundleTarget, Choice, DeviceKind, Precision, QuantizePrecision, Target, parse_choice
from pue.errors import BundleError, PueError


class PrecisionKind(Choice):
    """Where a precision lives."""

    WEIGHT = "weight"  # in the graphs (casts, Q/DQ nodes, int8 weights): any backend that runs the graphs runs it
    RUNTIME = "runtime"  # set on the backend at inference (e.g. bf16): it must honour it, never run another silently


class ActivationScheme(Choice):
    """How a Q/DQ flavour quantizes activations (the names the smoothing and SQNR simulation take)."""

    U8 = "u8"  # static, unsigned, asymmetric: x86 CPUs' u8×s8 kernels (s8×s8 is about 15× slower there)
    S8 = "s8"  # static, signed, symmetric: what TensorRT's explicit quantization expects
    DYNAMIC = "dynamic"  # uint8, scale computed per run by the kernel: onnxruntime on CPU
    # int8 per token and per group of input channels, computed per run by OpenVINO's CPU plugin (its dynamic
    # quantization of int8-weight MatMuls); the graphs hold int8 weights only (`pue.calibration.weights_only`)
    GROUPED = "grouped"


class TokenOutliers(Choice):
    """How an INT8 precision treats weight ops whose inputs carry massive tokens (`PrecisionSpec.token_outliers`)."""

    PER_TOKEN = "per_token"  # dynamic per-row scales, where the target's kernels run them in int8 (onnxruntime)
    # kept in float where the target has no per-token int8 kernel: OpenVINO computes the per-token rewrite's
    # MatMulInteger in f32 kernels on CPUs without its dynamic quantization (measured on AVX2), so float is cheaper
    FLOAT = "float"


@dataclass(frozen=True)
class QdqFlavour:
    """The Q/DQ nodes an INT8 bundle's graphs carry."""

    scheme: ActivationScheme
    activation_type: str  # element type of quantized activations: "uint8" or "int8"
    symmetric: bool  # symmetric activation scales (zero point 0)
    static: bool  # scales fixed from calibration data (`--calibration-method` applies); else computed per run
    dedicated_pairs: bool  # one Q/DQ pair per consumer (TensorRT fuses each into its consumer)
    description: str  # as the manifest records it (export.quantization.activations)
    weight_qmax: int  # int8 weights span [-weight_qmax, weight_qmax]: 64 (7 bits) where u8×s8 kernels could saturate
    weights: str  # as the manifest records it (export.quantization.weights)

    @property
    def reduced_weight_range(self) -> bool:
        return self.weight_qmax < 127


# x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8 activations by s8 weights with vpmaddubsw, which adds pairs of
# products into int16: 255·127·2 overflows it and the result saturates, silently (measured on an AVX2 EPYC: the ci
# preset's static int8 gate fell from mean cosine 0.9994 to 0.9932, top-1 0.75). 7-bit weights (255·64·2 < 32,767)
# cannot saturate, so the onnxruntime flavours keep them on every CPU: a bundle's gate then holds wherever it runs.
# TensorRT's s8×s8 on GPUs has no such limit.
INT8_WEIGHTS = "int8 symmetric per-channel"
INT8_WEIGHTS_7BIT = "int8 symmetric per-channel, 7-bit range (no u8×s8 saturation on CPUs without VNNI)"
# what the INT8 search chooses while its check fails with 7 bits (`pue.calibration.weight_storage`): the full 8-bit
# levels stored as uint8 around 128, which onnxruntime multiplies in u8×u8 kernels (no saturation, slower)
INT8_WEIGHTS_UNSIGNED = "int8 symmetric per-channel, 8-bit, stored as uint8 around 128 (u8×u8: no saturation)"
U8_ASYMMETRIC = QdqFlavour(
    ActivationScheme.U8, "uint8", False, True, False, "uint8 asymmetric per-tensor", 64, INT8_WEIGHTS_7BIT
)
S8_SYMMETRIC = QdqFlavour(ActivationScheme.S8, "int8", True, True, True, "int8 symmetric per-tensor", 127, INT8_WEIGHTS)
U8_DYNAMIC = QdqFlavour(
    ActivationScheme.DYNAMIC, "uint8", False, False, False, "uint8 dynamic per-tensor", 64, INT8_WEIGHTS_7BIT
)
# OpenVINO's CPU plugin quantizes the activations of MatMuls whose weights are int8 constants at run time, per token
# and per group of this many input channels, where the CPU has int8 dot products (VNNI, AMX); elsewhere it
# decompresses the weights to float. The group size is pinned at compile time (`DYNAMIC_QUANTIZATION_GROUP_SIZE`):
# OpenVINO's default differs across versions, and 0 turns it off. 32: measured on `bench` (AVX512-VNNI EPYC), the
# same accuracy as 64 and 128 within 1e-5 of mean cosine (BENCHMARKS.md "OpenVINO's run-time INT8").
OPENVINO_GROUP_SIZE = 32
OV_GROUPED = QdqFlavour(
    ActivationScheme.GROUPED,
    "int8",
    True,
    False,
    False,
    f"8-bit per token and per group of {OPENVINO_GROUP_SIZE} input channels, quantized at run time by OpenVINO",
    127,  # OpenVINO picks the kernels that run them; where it has none it computes the weights in float
    INT8_WEIGHTS,
)
CPU_INT8_ADVICE = (
    "this INT8 bundle was quantized for onnxruntime on CPU; on a GPU, INT8 runs through TensorRT: re-quantize with "
    "`pue-export quantize FP32_BUNDLE -o OUT --precision int8 --target tensorrt`, then `pue-export trt`"
)
TARGET_NAMES = {
    BundleTarget.ANY: "any target",
    BundleTarget.ONNXRUNTIME: "onnxruntime",
    BundleTarget.TENSORRT: "TensorRT",
    BundleTarget.OPENVINO: "OpenVINO",
}
DEVICE_NAMES = {DeviceKind.CPU: "CPU", DeviceKind.CUDA: "CUDA GPUs"}


@dataclass(frozen=True)
class PrecisionSpec:
    """One precision as made for one target: a row of `PRECISION_TABLE`."""

    precision: Precision
    target: BundleTarget  # `any`: the graphs serve every target, and a request for any target resolves to them
    kind: PrecisionKind
    weights: str  # as the manifest records it (export.quantization.weights)
    activations: str  # as the manifest records it (export.quantization.activations)
    qdq: QdqFlavour | None  # None: no Q/DQ nodes (float graphs)
    parent: Precision | None  # what `pue-export quantize` derives it from; None: only exported from a checkpoint
    calibration_data: bool  # making it reads calibration patches (scales, activation ranges or sensitivity)
    attention: tuple[Attention, ...]  # layouts its graphs may use, the default first
    devices: tuple[DeviceKind, ...]  # where its graphs are meant to run, whatever the backend
    engine_source: bool  # `pue-export trt` builds TensorRT engines from it
    note: str = ""  # why it is tied to its target or devices, said when it is refused
    device_advice: str = ""  # said when it is asked to run on another device
    # The type a backend computes float ops in: a runtime precision sets it on the backend (never its default).
    compute: str = "float32"
    # The manifest's `backend` kind: the backend whose kernels the gate measured (`auto` picks it first); None: the
    # parent's (ONNX graphs any capable backend runs).
    backend: str | None = None
    # What the INT8 search tries first for weight ops whose inputs carry massive tokens (one token's max |x| at least
    # 20× the median token's: a per-tensor step starves every other token): `TokenOutliers`, or None (the float
    # fallback's ranking alone decides).
    token_outliers: TokenOutliers | None = None
    # OpenVINO's run-time activation quantization group (`DYNAMIC_QUANTIZATION_GROUP_SIZE`, pinned when an OpenVINO
    # backend compiles the graphs); 0: off (what every entry whose graphs hold no int8-only weights gets)
    dynamic_group: int = 0

    @property
    def calibrated(self) -> bool:
        """Static activation scales from calibration data: `--calibration-method` applies."""
        return self.qdq is not None and self.qdq.static

    @property
    def weight_type(self) -> str:
        """What the weights are stored as (int8, float16, float32), whatever their range or scales."""
        return "int8" if self.qdq is not None else self.weights

    @property
    def default_attention(self) -> Attention:
        return self.attention[0]

    def runs_on(self, device: object) -> bool:
        """Whether `device` ("cpu", "cuda", "cuda:1") is one this entry's graphs are meant for."""
        return str(device).partition(":")[0] in self.devices

    def check_device(self, device: object) -> None:
        """Refuse a device this entry's graphs are not meant for, with the entry's advice."""
        if not self.runs_on(device):
            where = " or ".join(DEVICE_NAMES[kind] for kind in self.devices)
            raise PueError(self.device_advice or f"{self.precision} bundles for {self.target} run on {where} only")


_OPENVINO_INT8 = PrecisionSpec(
    Precision.INT8,
    BundleTarget.OPENVINO,
    PrecisionKind.WEIGHT,
    weights=U8_ASYMMETRIC.weights,
    activations=U8_ASYMMETRIC.description,
    qdq=U8_ASYMMETRIC,  # OpenVINO's CPU plugin runs u8 activations × 7-bit s8 weights in int8 kernels on any x86
    parent=Precision.FP32,
    calibration_data=True,
    attention=(Attention.STANDARD,),  # OpenVINO reads standard ONNX attention only
    devices=(DeviceKind.CPU,),
    engine_source=False,
    note="unsigned activations and 7-bit weights, compiled by OpenVINO's CPU plugin into int8 kernels",
    token_outliers=TokenOutliers.FLOAT,
    # pinned for the int8-weight ops the search may leave to OpenVINO's run-time quantization while static Q/DQ fails
    # (`search_variants.per_token_path`); it changes nothing for the Q/DQ-fused and float MatMuls (only compressed-
    # weight FullyConnected ops quantize their activations at run time; measured: identical embeddings with 0 and 32)
    dynamic_group=OPENVINO_GROUP_SIZE,
    device_advice=(
        "an INT8 bundle for OpenVINO runs on the CPU; on a GPU, INT8 runs through TensorRT: re-quantize with "
        "`pue-export quantize FP32_BUNDLE -o OUT --precision int8 --target tensorrt`, then `pue-export trt`"
    ),
    backend="openvino",
)
_OPENVINO_INT8_DYNAMIC = PrecisionSpec(
    Precision.INT8_DYNAMIC,
    BundleTarget.OPENVINO,
    PrecisionKind.WEIGHT,
    weights=OV_GROUPED.weights,
    activations=OV_GROUPED.description,
    qdq=OV_GROUPED,
    parent=Precision.FP32,
    calibration_data=True,  # GPTQ's moments, the calibration check and the fallback's ranking
    attention=(Attention.STANDARD,),
    devices=(DeviceKind.CPU,),
    engine_source=False,
    note="int8 weights whose activations OpenVINO's CPU plugin quantizes per token at run time",
    device_advice=(
        "an int8-dynamic bundle for OpenVINO runs on the CPU; on a GPU, INT8 runs through TensorRT: re-quantize "
        "with `pue-export quantize FP32_BUNDLE -o OUT --precision int8 --target tensorrt`, then `pue-export trt`"
    ),
    backend="openvino",
    dynamic_group=OPENVINO_GROUP_SIZE,
)


def _with_bf16_rest(spec: PrecisionSpec, precision: Precision, what: str) -> PrecisionSpec:
    """`spec`'s graphs with every op but its int8 weight MatMuls computed in bf16 by OpenVINO (native bf16 CPUs)."""
    return replace(
        spec,
        precision=precision,
        activations=f"{spec.activations} at int8 MatMuls; bfloat16 elsewhere (OpenVINO inference precision)",
        note=f"{what} with bf16 for the rest, in OpenVINO's CPU plugin on CPUs with native bf16",
        device_advice=f"an {precision} bundle runs in OpenVINO on a CPU with native bf16 (AVX512-BF16 or AMX)",
        compute="bfloat16",
    )


PRECISION_TABLE: tuple[PrecisionSpec, ...] = (
    PrecisionSpec(
        Precision.FP32,
        BundleTarget.ANY,
        PrecisionKind.WEIGHT,
        weights="float32",
        activations="float32",
        qdq=None,
        parent=None,
        calibration_data=False,
        attention=(Attention.STANDARD,),
        devices=(DeviceKind.CPU, DeviceKind.CUDA),
        engine_source=True,
    ),
    PrecisionSpec(
        Precision.FP16,
        BundleTarget.ANY,
        PrecisionKind.WEIGHT,
        weights="float16",
        activations="float16",
        qdq=None,
        parent=Precision.FP32,
        calibration_data=True,  # activation ranges decide which ops stay FP32 (|x| > 16,000)
        attention=(Attention.STANDARD,),
        devices=(DeviceKind.CPU, DeviceKind.CUDA),
        engine_source=True,
    ),
    PrecisionSpec(
        Precision.INT8,
        BundleTarget.ONNXRUNTIME,
        PrecisionKind.WEIGHT,
        weights=U8_ASYMMETRIC.weights,
        activations=U8_ASYMMETRIC.description,
        qdq=U8_ASYMMETRIC,
        parent=Precision.FP32,
        calibration_data=True,
        attention=(Attention.FUSED, Attention.STANDARD),
        devices=(DeviceKind.CPU,),
        engine_source=False,
        note="unsigned activations, for onnxruntime on x86 CPUs",
        device_advice=CPU_INT8_ADVICE,
        token_outliers=TokenOutliers.FLOAT,  # static Q/DQ has no per-token scales
    ),
    PrecisionSpec(
        Precision.INT8,
        BundleTarget.TENSORRT,
        PrecisionKind.WEIGHT,
        weights=S8_SYMMETRIC.weights,
        activations=S8_SYMMETRIC.description,
        qdq=S8_SYMMETRIC,
        parent=Precision.FP32,
        calibration_data=True,
        attention=(Attention.STANDARD,),
        devices=(DeviceKind.CPU, DeviceKind.CUDA),
        engine_source=True,
        token_outliers=TokenOutliers.FLOAT,  # standard ONNX has no per-token int8
    ),
    _OPENVINO_INT8,
    PrecisionSpec(
        Precision.INT8_DYNAMIC,
        BundleTarget.ONNXRUNTIME,
        PrecisionKind.WEIGHT,
        weights=U8_DYNAMIC.weights,
        activations=U8_DYNAMIC.description,
        qdq=U8_DYNAMIC,
        parent=Precision.FP32,
        calibration_data=True,  # smoothing and the sensitivity ranking read activation statistics
        attention=(Attention.FUSED, Attention.STANDARD),
        devices=(DeviceKind.CPU,),
        engine_source=False,
        note="dynamic INT8 (activations quantized at run time) runs only in onnxruntime on CPU",
        device_advice=CPU_INT8_ADVICE,
        token_outliers=TokenOutliers.PER_TOKEN,
    ),
    _OPENVINO_INT8_DYNAMIC,
    PrecisionSpec(
        Precision.BF16,
        BundleTarget.OPENVINO,
        PrecisionKind.RUNTIME,
        weights="float32",  # the fp32 graphs, hard-linked: OpenVINO converts weights when it compiles
        activations="bfloat16 (OpenVINO inference precision)",
        qdq=None,
        parent=Precision.FP32,
        calibration_data=False,
        attention=(Attention.STANDARD,),
        devices=(DeviceKind.CPU,),
        engine_source=False,
        note="bf16 inference in OpenVINO's CPU plugin, on CPUs with native bf16 (AVX512-BF16 or AMX)",
        device_advice=(
            "a bf16 bundle runs in OpenVINO on a CPU with native bf16 (AVX512-BF16 or AMX); on a GPU, use the fp32 "
            "parent's fp16 bundle or TensorRT engines"
        ),
        compute="bfloat16",
        backend="openvino",
    ),
    _with_bf16_rest(_OPENVINO_INT8, Precision.INT8_BF16, "int8 weight MatMuls"),
    _with_bf16_rest(_OPENVINO_INT8_DYNAMIC, Precision.INT8_DYNAMIC_BF16, "run-time int8 weight MatMuls"),
)

_BY_KEY = {(spec.precision, spec.target): spec for spec in PRECISION_TABLE}


def lookup(precision: str, target: str) -> PrecisionSpec | None:
    """The entry made for exactly this precision and target (no `any` fallback), or None."""
    return _BY_KEY.get((str(precision), str(target)))


def specs_of(precision: str) -> tuple[PrecisionSpec, ...]:
    """Every entry of `precision`, in table order."""
    return tuple(spec for spec in PRECISION_TABLE if spec.precision == precision)


def precision_spec(precision: str, target: str) -> PrecisionSpec:
    """The entry for `precision` made for `target`: the exact one, else the precision's `any` entry; refused with
    the targets it has and the precision that does have `target` otherwise. Validates both names."""
    parsed = parse_choice(Precision, precision, "precision")
    wanted = parse_choice(BundleTarget, target, "target")
    spec = lookup(parsed, wanted) or lookup(parsed, BundleTarget.ANY)
    if spec is not None:
        return spec
    own = specs_of(parsed)
    devices = {device for entry in own for device in entry.devices}
    where = " or ".join(TARGET_NAMES[entry.target] for entry in own)
    if len(devices) == 1:
        where += f" on {DEVICE_NAMES[next(iter(devices))].removesuffix('s')}"
    alternatives = [
        entry for entry in PRECISION_TABLE if entry.target == wanted and entry.weight_type == own[0].weight_type
    ]
    hint = (
        f"for {TARGET_NAMES[wanted]} use --precision {alternatives[0].precision} --target {wanted}"
        if alternatives
        else f"choose a target among: {', '.join(str(entry.target) for entry in own)}"
    )
    raise PueError(f"{parsed} is for {where} only", hint)


def quantize_spec(precision: str, target: str) -> PrecisionSpec:
    """What `pue-export quantize --precision P --target T` makes (both validated as that command's choices)."""
    parse_choice(QuantizePrecision, precision, "precision")
    return precision_spec(precision, parse_choice(Target, target, "target"))


def bundle_spec(precision: str, target: str) -> PrecisionSpec:
    """The entry of a bundle's manifest; precisions and targets this pue does not know are a BundleError."""
    try:
        return precision_spec(precision, target)
    except PueError as exc:
        known = bool(specs_of(precision)) and str(target) in BundleTarget.values()
        raise BundleError(
            f"the bundle's manifest names precision '{precision}' for target '{target}': {exc.message}",
            exc.hint if known else f"{exc.hint}; a newer pue may have written it: install the pue that did",
        ) from None


def engine_precisions() -> tuple[Precision, ...]:
    """Precisions `pue-export trt` builds engines from, in table order."""
    return tuple(dict.fromkeys(spec.precision for spec in PRECISION_TABLE if spec.engine_source))


def engine_source_for(precision: str) -> PrecisionSpec | None:
    """The entry `pue-export trt` takes that holds the same weights as `precision` (int8-dynamic → int8/tensorrt)."""
    own = specs_of(precision)
    if not own:
        return None
    return next(
        (spec for spec in PRECISION_TABLE if spec.engine_source and spec.weight_type == own[0].weight_type),
        None,
    )


def quantized_precisions() -> tuple[Precision, ...]:
    """Precisions `pue-export quantize` derives, in table order."""
    return tuple(dict.fromkeys(spec.precision for spec in PRECISION_TABLE if spec.parent is not None))


__all__ = [
    "ActivationScheme",
    "CPU_INT8_ADVICE",
    "PRECISION_TABLE",
    "PrecisionKind",
    "PrecisionSpec",
    "QdqFlavour",
    "TokenOutliers",
    "bundle_spec",
    "engine_precisions",
    "engine_source_for",
    "lookup",
    "precision_spec",
    "quantize_spec",
    "quantized_precisions",
    "specs_of",
]
