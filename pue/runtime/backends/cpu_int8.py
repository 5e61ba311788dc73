"""Which INT8 bundles a device runs faithfully, for the onnxruntime and OpenVINO backends.

x86 CPUs without VNNI or AMX multiply uint8 activations by int8 weights with `vpmaddubsw`, which sums pairs of
products in int16 and saturates with full-range weights (measured on an AVX2 EPYC: `pue.runtime.cpu.saturating_u8s8`
is the rule). pue keeps 7-bit weights for onnxruntime-target INT8 so that its bundles are exact on every CPU; for
the rest, these checks refuse what would silently differ from the gate, or compute Q/DQ pairs in float, and say so.
"""

from __future__ import annotations

import logging

from pue.bundle import Manifest
from pue.errors import BundleError
from pue.precisions import INT8_WEIGHTS, ActivationScheme, PrecisionSpec, bundle_spec
from pue.runtime.backends.base import Device
from pue.runtime.cpu import saturating_u8s8

log = logging.getLogger(__name__)

__all__ = [
    "QDQ_IN_FLOAT",
    "refuse_cpu_int8_on_cuda",
    "refuse_saturating_int8",
    "refuse_saturating_weights",
    "s8_qdq_in_float",
]


def refuse_cpu_int8_on_cuda(manifest: Manifest, device: Device) -> None:
    """Refuse a bundle whose graphs are meant for other devices (CPU-target INT8 on CUDA), with the table's advice."""
    bundle_spec(manifest.precision, manifest.target).check_device(device)


QDQ_IN_FLOAT = {"session.disable_quant_qdq": "1"}  # DequantizeLinear → float MatMul: no int8 kernel involved


def s8_qdq_in_float(manifest: Manifest, device: Device) -> dict[str, str]:
    """Session config for signed (TensorRT-target) Q/DQ graphs on a CPU whose int8 kernels saturate.

    onnxruntime turns s8×s8 into u8×s8 on x86 and, without VNNI, sums product pairs in int16: with full-range
    weights the results saturate (measured on an AVX2 EPYC, `ci` preset: mean cosine 0.99596 and min 0.98946 with
    the int8 kernels, 0.99975 and 0.99941 with the Q/DQ pairs computed in float). Computing them in float gives the
    arithmetic TensorRT runs on a GPU, slower; said once in the log, never silently.
    """
    spec = bundle_spec(manifest.precision, manifest.target)
    if device.is_cuda or spec.qdq is None or spec.qdq.scheme != ActivationScheme.S8 or not saturating_u8s8():
        return {}
    log.warning(
        "this CPU's int8 kernels would saturate on the bundle's full-range s8 weights: its Q/DQ pairs run in float "
        "(faithful, slower); on a CPU with VNNI or AMX, or on a GPU, they run in int8"
    )
    return dict(QDQ_IN_FLOAT)


def refuse_saturating_int8(manifest: Manifest, device: Device) -> None:
    """Refuse u8×s8 INT8 graphs with full-range weights on a CPU whose int8 kernels saturate (x86 without VNNI).

    Such bundles (made before pue kept 7-bit weights for onnxruntime) would run, but their embeddings would differ
    from what their gate measured, silently.
    """
    spec = bundle_spec(manifest.precision, manifest.target)
    quantization = manifest.export.quantization
    if device.is_cuda or spec.qdq is None or spec.qdq.scheme == ActivationScheme.S8 or quantization is None:
        return
    if quantization.weights == INT8_WEIGHTS and saturating_u8s8():
        raise BundleError(
            f"this {manifest.precision} bundle keeps full-range int8 weights, and this CPU (x86 without VNNI or "
            "AMX) multiplies uint8 activations by them in int16 pair sums that saturate: its embeddings would "
            "silently differ from what its gate measured",
            "re-quantize its FP32 parent with this version of pue-export (7-bit weights, faithful on every CPU), "
            "or run it on a CPU with AVX-VNNI, AVX512-VNNI or AMX",
        )


def refuse_saturating_weights(spec: PrecisionSpec, weights: str | None = None) -> None:
    """Refuse full-range int8 weights on an x86 CPU without VNNI or AMX, where OpenVINO's int8 kernels sum product
    pairs in int16 and saturate (on the `ci` preset's TensorRT-target bundle: cosine 0.9958 against the same Q/DQ
    computed in float, where the gate asks 0.98 minimum but a faithful runtime gives 0.99999). `weights`: the
    manifest's `export.quantization.weights`, which says where an OpenVINO INT8 bundle took 8-bit weights (made on a
    CPU with VNNI or AMX, `search_variants.widens_weights`) although its precision keeps 7 bits."""
    full_range = spec.qdq is not None and (not spec.qdq.reduced_weight_range or weights == INT8_WEIGHTS)
    # OpenVINO's run-time INT8 (int8 weights alone): OpenVINO picks the kernels that multiply them, or computes them
    # in float on a CPU without int8 dot products; no Q/DQ pair of pue's asks for a u8×s8 kernel
    if not full_range or spec.qdq.scheme == ActivationScheme.GROUPED or not saturating_u8s8():
        return
    advice = (
        "run it on a CPU with AVX-VNNI, AVX512-VNNI or AMX (where it was made), or re-quantize its FP32 parent on this "
        "CPU (7-bit weights) or with --no-wide-weights (7-bit weights, faithful on every CPU)"
        if spec.qdq.reduced_weight_range
        else "run it with backend='onnxruntime' (which computes its Q/DQ pairs in float on such a CPU), or on a CPU "
        "with AVX-VNNI, AVX512-VNNI or AMX"
    )
    raise BundleError(
        f"this {spec.precision} bundle (target {spec.target}) keeps full-range int8 weights, and OpenVINO's int8 "
        "kernels on this CPU (x86 without VNNI or AMX) saturate on them: its embeddings would differ from what its "
        "gate measured",
        advice,
    )
