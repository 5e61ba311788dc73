"""The fixed sets of values that commands and the library accept, as enums: validated once at the edge.

The command line parses options into these (typer lists the values in `--help` and refuses others with exit 2);
the library takes either an enum member or its string value. What each precision and target means (its targets,
devices, Q/DQ flavour, ...) is one table in `pue.precisions`. Stdlib only: the runtime may import it.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from pue.errors import PueError


class Choice(str, Enum):
    """A string enum whose members compare equal to their values (``Precision.INT8 == "int8"``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __hash__(self) -> int:  # as its string, so dicts keyed by the plain strings find members too
        return hash(str(self.value))

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Precision(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT8_DYNAMIC = "int8-dynamic"
    BF16 = "bf16"
    INT8_BF16 = "int8-bf16"
    INT8_DYNAMIC_BF16 = "int8-dynamic-bf16"


class QuantizePrecision(Choice):
    """What `pue-export quantize` derives from an FP32 bundle."""

    INT8 = "int8"
    INT8_DYNAMIC = "int8-dynamic"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8_BF16 = "int8-bf16"  # OpenVINO: int8 weight MatMuls, bf16 for the rest
    INT8_DYNAMIC_BF16 = "int8-dynamic-bf16"  # OpenVINO: run-time int8 weight MatMuls, bf16 for the rest


class Target(Choice):
    """What `pue-export quantize --target` makes graphs for."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"


class BundleTarget(Choice):
    """A manifest's `target`: a `Target`, or `any` for graphs every backend takes (FP32, FP16)."""

    ANY = "any"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"


class DeviceKind(Choice):
    """Where a backend runs: the kind of a device string ("cuda:1" is CUDA)."""

    CPU = "cpu"
    CUDA = "cuda"


class CalibrationMethod(Choice):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class Rotate(Choice):
    """Rotate the language model's residual stream before INT8 (`pue.calibration.rotation`)."""

    AUTO = "auto"  # when the decoder's norm outputs carry channel outliers
    ON = "on"
    OFF = "off"


class Attention(Choice):
    FUSED = "fused"
    STANDARD = "standard"


class Exporter(Choice):
    TORCHSCRIPT = "torchscript"
    DYNAMO = "dynamo"


class ExportDtype(Choice):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


class FeatureFormat(Choice):
    """`pue-embed --format`: one file per slide."""

    H5 = "h5"
    PARQUET = "parquet"


class Engine(Choice):
    """`pue-embed slides --engine`: where the tiles are read and embedded."""

    LOCAL = "local"  # this process: a reader thread and the runtime
    RAY = "ray"  # a Ray cluster (the `ray` extra): reading tasks, an actor pool of sessions


class FeatureDtype(Choice):
    """`pue-embed --dtype`: the stored features' dtype."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"


class HardwareCompat(Choice):
    NONE = "none"
    SAME_COMPUTE_CAPABILITY = "same_compute_capability"
    AMPERE_PLUS = "ampere_plus"


class TinyArchitecture(Choice):
    LLAVA_NEXT = "llava_next"
    LLAVA = "llava"
    QWEN2_VL = "qwen2_vl"
    QWEN2_5_VL = "qwen2_5_vl"
    QWEN3_VL = "qwen3_vl"


class TinyPreset(Choice):
    CI = "ci"
    E5V = "e5v"
    BENCH = "bench"
    OUTLIERS = "outliers"  # compensated: the function is unchanged (smoothing undoes it exactly)
    GAINS_FEW = "gains-few"
    GAINS_ALL = "gains-all"
    MASSIVE = "massive"
    VIT_HIGHNORM = "vit-highnorm"


class OutlierGain(Choice):
    """The fixed norm gains of the `gains-few` / `gains-all` tiny presets."""

    G20 = "20"
    G70 = "70"  # the 60-80x of the LLaVA-NeXT checkpoint issue 13 describes
    G100 = "100"
    G1000 = "1000"


C = TypeVar("C", bound=Choice)


def parse_choice(kind: type[C], value: str | C, option: str | None = None) -> C:
    """`value` as a member of `kind`, or a PueError listing the valid values (library callers pass strings)."""
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value))
    except ValueError:
        name = option or kind.__name__
        raise PueError(f"unknown {name} {value!r}", f"choose one of: {', '.join(kind.values())}") from None
