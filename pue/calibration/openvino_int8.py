"""INT8 for OpenVINO (`pue-export quantize --precision int8 --target openvino`): what differs from the other INT8
targets, which all go through `quantize_bundle`'s calibration, search and gate.

- **The graphs.** pue's own static Q/DQ graphs (the precision table's entry: uint8 asymmetric activations, 7-bit
  symmetric per-channel weights, standard ONNX attention). OpenVINO's CPU plugin folds each Q/DQ pair into its
  consumer and runs the weight MatMuls in int8 kernels; 7-bit weights cannot saturate the int16 pair sums of x86 CPUs
  without VNNI (`pue.runtime.cpu.saturating_u8s8`), so the bundle's gate holds on every x86 CPU. On such CPUs
  OpenVINO's int8 FullyConnected kernel (`jit_gemm_I8`) is slower than its fp32 `brgemm` (the `bench` preset: 0.75×
  OpenVINO fp32 on an AVX2 EPYC); its `brgemm` int8 kernels need VNNI or AMX.
- **Massive tokens.** OpenVINO has no per-token int8 kernel (its dynamic quantization is not applied on AVX2, and
  pue's per-token MatMulInteger rewrite compiles to an fp32 FullyConnected), so the precision table's entry says
  `token_outliers: float`: ops whose inputs carry massive tokens are the search's first float step. Where static
  Q/DQ still fails after every variant, the search's last variant gives every weight MatMul int8 weights alone, whose
  inputs OpenVINO quantizes per token and group at run time where the CPU has int8 dot products (the int8-dynamic
  arithmetic; `search_variants.per_token_path`), so the precision pins OpenVINO's group size.
- **The gate** runs OpenVINO (the manifest's `backend` is `openvino`, so `auto` picks it): what is gated is the
  arithmetic that ships, int8 kernels included. `int8_layers` reads OpenVINO's performance counters to show it.
- **Mixed precision** (`int8-bf16`: int8 weight MatMuls, bf16 for the rest) needs a CPU with native bf16 to be
  gated: on any other CPU the command refuses before any work, as the bf16 deployment does.

NNCF's post-training quantization is the alternative it is compared with (scripts/nncf_openvino_int8.py, on the same
calibration readers and gate; it passes only with attention's activation products kept float; BENCHMARKS.md
"OpenVINO INT8").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pue.extras import package_versions
from pue.precisions import ActivationScheme, PrecisionSpec

OPENVINO_BACKEND = "openvino"


def needs_openvino(spec: PrecisionSpec) -> bool:
    """Whether making `spec` gates by running OpenVINO (its entry names that backend)."""
    return spec.backend == OPENVINO_BACKEND


def check_openvino_request(spec: PrecisionSpec) -> None:
    """Before any work: openvino must be installed, and a bf16 compute type needs a CPU with native bf16 (else the
    gate would measure f32 and prove nothing)."""
    if not needs_openvino(spec):
        return
    from pue.runtime.backends.openvino import import_openvino, refuse_without_bf16

    core = import_openvino().Core()
    if spec.compute == "bfloat16":
        refuse_without_bf16(
            core, f"a gated {spec.precision} bundle (int8 weight MatMuls, bf16 elsewhere: the gate would measure f32)"
        )


def openvino_gate_device(spec: PrecisionSpec | None = None) -> str:
    """Where an OpenVINO-target gate ran, as fidelity.json and the manifest record it."""
    version = package_versions(["openvino"]).get("openvino")
    if spec is not None and spec.qdq is not None and spec.qdq.scheme == ActivationScheme.GROUPED:
        return (
            f"cpu (OpenVINO {version}: int8 weights, activations quantized at run time per token in groups of "
            f"{spec.dynamic_group} where this CPU has int8 dot products: {', '.join(int_dot_products())})"
        )
    return f"cpu (OpenVINO {version}: its int8 kernels where the graphs hold Q/DQ pairs)"


def int_dot_products() -> list[str]:
    """This CPU's int8 dot-product instruction sets as /proc/cpuinfo names them (empty where none, or not Linux)."""
    from pue.runtime.cpu import cpu_flags

    names = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
    found = [label for flag, label in names.items() if flag in cpu_flags()]
    return found or ["none: weights computed in float"]


def int8_layers(profile: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The executed layers of an OpenVINO profile (`OpenVinoBackend.profiling_data()[graph]`) that ran in an int8
    kernel, with their kernel names."""
    from pue.runtime.backends.openvino import int8_kernel

    return [row for row in profile if row.get("status") == "EXECUTED" and int8_kernel(row.get("exec_type", ""))]


__all__ = ["check_openvino_request", "int8_layers", "int_dot_products", "needs_openvino", "openvino_gate_device"]
