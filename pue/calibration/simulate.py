"""Int8 quantize→dequantize in numpy, the way onnxruntime's QDQ ops do it, to score layers without rebuilding."""

from __future__ import annotations

import numpy as np

ACTIVATION_SCHEMES = ("u8", "s8", "dynamic", "grouped")
GROUP = 32  # `grouped`'s channels per step (pue.precisions.OPENVINO_GROUP_SIZE; numpy only here)


def qdq_activation(x: np.ndarray, lo: float, hi: float, scheme: str) -> np.ndarray:
    """u8: asymmetric uint8 over [min(lo,0), max(hi,0)] (onnxruntime CPU); s8: symmetric int8 (TensorRT);
    dynamic: asymmetric uint8 over this tensor's own range (DynamicQuantizeLinear); grouped: symmetric int8 per row
    and per group of 32 channels (OpenVINO's run-time quantization, as far as its documentation says: the ranking's
    model of it, the check measures the real thing)."""
    if scheme == "grouped":
        return qdq_grouped(x)
    if scheme == "dynamic":
        lo, hi = float(x.min()), float(x.max())
    if scheme == "s8":
        scale = max(abs(lo), abs(hi)) / 127.0 or 1.0
        return np.clip(np.round(x / scale), -127, 127) * scale
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero_point = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero_point, 0, 255) - zero_point) * scale


WEIGHT_QMAX = {"u8": 64, "dynamic": 64, "s8": 127, "grouped": 127}  # the u8×s8 flavours keep 7-bit weights


def qdq_grouped(x: np.ndarray, group: int = GROUP) -> np.ndarray:
    """Symmetric int8 of each row's channels in groups of `group` (the last group may be shorter)."""
    rows = np.asarray(x, dtype=np.float32)
    out = np.empty_like(rows)
    for start in range(0, rows.shape[-1], group):
        part = rows[..., start : start + group]
        scale = np.abs(part).max(axis=-1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        out[..., start : start + group] = np.clip(np.round(part / scale), -127, 127) * scale
    return out


def qdq_weight(weight: np.ndarray, qmax: int = 127) -> np.ndarray:
    """Per-output-channel symmetric int8 of a [K, N] weight over [-qmax, qmax]."""
    scale = np.abs(weight).max(axis=0, keepdims=True) / float(qmax)
    scale[scale == 0] = 1.0
    return np.clip(np.round(weight / scale), -qmax, qmax) * scale


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    noise = float(np.sum((reference.astype(np.float64) - approximation) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def matmul_sqnr(samples: list[np.ndarray], weight: np.ndarray, lo: float, hi: float, scheme: str) -> float:
    """SQNR (dB) of one MatMul with int8 input and weight, against float, on sampled token rows."""
    weight_q = qdq_weight(weight, WEIGHT_QMAX[scheme])
    reference, approximation = [], []
    for rows in samples:
        reference.append(rows @ weight)
        approximation.append(qdq_activation(rows, lo, hi, scheme) @ weight_q)
    return sqnr_db(np.concatenate(reference), np.concatenate(approximation))
