"""The machine's matrix-multiply peaks, measured in the same run as the latency rows they are compared with.

One square product per precision, in a subprocess of its own (so its threads and memory touch nothing else):

* CPU: fp32 through onnxruntime's MatMul (its kernels use AVX-512 where PyTorch's MKL may not) and through
  torch; int8 as onnxruntime's MatMulInteger with unsigned activations and signed constant weights (u8×s8, the
  VNNI path quantized bundles take on x86); bf16 as torch.matmul on bfloat16 tensors.
* CUDA: fp32 (TF32 off), fp16 and bf16 through torch.matmul, int8 through torch._int_mm where it exists.

Each product is warmed up, then repeated for at least `min_seconds`; the best rate is the peak (GFLOP/s, or
GOP/s for int8). `python -m pue.benchmarks.peaks '{"threads": 2, "device": "cpu"}'` prints the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pue.errors import PueError

CPU_SIZE = 2048
GPU_SIZE = 8192
MIN_SECONDS = 0.3
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class GpuDatasheet:
    """Dense (no sparsity) tensor-core peaks from NVIDIA's own documents: FP16/BF16 with FP32 accumulate, INT8."""

    name: str
    fp16_tflops: float
    int8_tops: float
    source: str


# Datasheets quote "with sparsity" figures (marked *) next to dense ones, or only sparse ones with the note that
# dense is half: the dense value is what a dense LLaVA runs at. Best case only: no card reaches its datasheet peak.
GPU_DATASHEETS = (
    GpuDatasheet(
        "GeForce RTX 4090",
        165.2,
        660.6,
        "NVIDIA Ada GPU Architecture whitepaper v2.01, GeForce RTX 4090 specifications: Peak FP16/BF16 "
        "Tensor TFLOPS with FP32 Accumulate 165.2 | 330.4*, Peak INT8 Tensor TOPS 660.6 | 1321.2* "
        "(* with sparsity)",
    ),
    GpuDatasheet(
        "NVIDIA A40",
        149.7,
        299.3,
        "NVIDIA A40 datasheet: Peak BF16 Tensor TFLOPS with FP32 Accumulate 149.7 | 299.4*, "
        "Peak INT8 Tensor TOPS 299.3 | 598.6* (* with sparsity)",
    ),
    GpuDatasheet(
        "NVIDIA L40S",
        362.05,
        733.0,
        "NVIDIA L40S datasheet: BFLOAT16 / FP16 Tensor Core TFLOPS 362.05 | 733*, "
        "INT8 Tensor TOPS 733 | 1,466* (* with sparsity)",
    ),
    GpuDatasheet(
        "NVIDIA A100 80GB",
        312.0,
        624.0,
        "NVIDIA A100 Tensor Core GPU datasheet: BFLOAT16 / FP16 Tensor Core 312 | 624* TFLOPS, "
        "INT8 Tensor Core 624 | 1,248* TOPS (* with sparsity)",
    ),
    GpuDatasheet(
        "NVIDIA H100 PCIe",
        756.5,
        1513.0,
        "NVIDIA H100 Tensor Core GPU datasheet: BFLOAT16 / FP16 Tensor Core 1,513* TFLOPS, INT8 Tensor Core "
        "3,026* TOPS (* with sparsity; specifications 1/2 lower without sparsity)",
    ),
    GpuDatasheet(
        "NVIDIA H100 SXM",
        989.5,
        1979.0,
        "NVIDIA H100 Tensor Core GPU datasheet: BFLOAT16 / FP16 Tensor Core 1,979* TFLOPS, INT8 Tensor Core "
        "3,958* TOPS (* with sparsity; specifications 1/2 lower without sparsity)",
    ),
)


def gpu_best_case(flops_per_patch: float, patches_per_slide: int) -> list[dict[str, Any]]:
    """Minutes per slide on each card if every FLOP ran at its datasheet peak (FP16/BF16, and all-INT8)."""
    rows = []
    for card in GPU_DATASHEETS:
        fp16_rate = card.fp16_tflops * 1e12 / flops_per_patch
        int8_rate = card.int8_tops * 1e12 / flops_per_patch
        rows.append(
            {
                "gpu": card.name,
                "fp16_tflops": card.fp16_tflops,
                "int8_tops": card.int8_tops,
                "patches_per_s_fp16": fp16_rate,
                "minutes_per_slide_fp16": patches_per_slide / fp16_rate / 60,
                "patches_per_s_int8": int8_rate,
                "minutes_per_slide_int8": patches_per_slide / int8_rate / 60,
                "source": card.source,
            }
        )
    return rows


def measure_peaks(threads: int | None = None, device: str = "cpu", timeout_s: float = 120.0) -> dict[str, Any]:
    """Peaks per precision in a fresh subprocess: {"fp32": {"gflops": …, "how": …}, …, "threads": …}."""
    spec = json.dumps({"threads": threads, "device": device})
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "pue.benchmarks.peaks", spec],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=_child_env(),
        )
    except subprocess.TimeoutExpired as exc:
        raise PueError(f"measuring matmul peaks took longer than {timeout_s:.0f} s", "skip it with --no-peaks") from exc
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-8:])
        raise PueError(
            f"measuring matmul peaks failed (exit {completed.returncode}): {tail}", "skip it with --no-peaks"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def peak_for(peaks: dict[str, Any] | None, precision: str, device: str) -> float | None:
    """The peak (GFLOP/s) a row of `precision` is held against: fp32 rows → fp32, bf16 → bf16, int8* → int8,
    fp16 → fp16 on CUDA but fp32 on CPU (onnxruntime computes FP16 ops in FP32 there)."""
    if not peaks:
        return None
    if precision.startswith("int8"):
        key = "int8"
    elif precision == "fp16":
        key = "fp16" if device.startswith("cuda") else "fp32"
    elif precision == "bf16":
        key = "bf16"
    else:
        key = "fp32"
    entry = peaks.get(key)
    return float(entry["gflops"]) if isinstance(entry, dict) and entry.get("gflops") else None


# ------------------------------------------------------------------------------------------- in the child


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _best_rate(
    run: Callable[[], Any], operations: float, min_seconds: float = MIN_SECONDS, sync: Callable[[], None] | None = None
) -> float:
    """Best GFLOP/s over repetitions filling `min_seconds` (at least 3), after one warm-up call."""
    run()
    if sync:
        sync()
    best = float("inf")
    started = time.perf_counter()
    repetitions = 0
    while repetitions < 3 or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        run()
        if sync:
            sync()
        best = min(best, time.perf_counter() - begin)
        repetitions += 1
    return operations / best / 1e9


def _ort_peaks(threads: int | None, size: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    results = {}
    for precision, op, a_type, a_value, b_value in (
        (
            "fp32",
            "MatMul",
            TensorProto.FLOAT,
            rng.standard_normal((size, size), dtype=np.float32),
            rng.standard_normal((size, size), dtype=np.float32),
        ),
        (
            "int8",
            "MatMulInteger",
            TensorProto.UINT8,
            rng.integers(0, 256, (size, size), dtype=np.uint8),
            rng.integers(-128, 128, (size, size), dtype=np.int8),
        ),
    ):
        out_type = TensorProto.FLOAT if precision == "fp32" else TensorProto.INT32
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["y"])],
            f"peak_{precision}",
            [helper.make_tensor_value_info("a", a_type, [size, size])],
            [helper.make_tensor_value_info("y", out_type, [size, size])],
            [numpy_helper.from_array(b_value, "b")],  # constant weights, prepacked like a bundle's
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 9)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        gflops = _best_rate(lambda s=session, a=a_value: s.run(None, {"a": a}), 2.0 * size**3)
        kind = "u8×s8 MatMulInteger" if precision == "int8" else "MatMul"
        results[precision] = {"gflops": round(gflops, 1), "how": f"onnxruntime {ort.__version__} {kind} {size}³"}
        del session
    return results


def _torch_peaks(threads: int | None, device: str, size: int) -> dict[str, Any]:
    import torch

    from pue.runtime.cpu import cpu_supports_bf16

    if threads and not device.startswith("cuda"):
        torch.set_num_threads(threads)
    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else None
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = {"fp32": torch.float32}
    if on_cuda or cpu_supports_bf16():  # elsewhere PyTorch emulates bf16 (minutes for one matmul, no peak to hold to)
        dtypes["bf16"] = torch.bfloat16
    if on_cuda:
        dtypes["fp16"] = torch.float16
    results = {}
    for name, dtype in dtypes.items():
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        with torch.inference_mode():
            gflops = _best_rate(lambda a=a, b=b: torch.matmul(a, b), 2.0 * size**3, sync=sync)
        results[name] = {"gflops": round(gflops, 1), "how": f"torch {torch.__version__.split('+')[0]} matmul {size}³"}
    if on_cuda and hasattr(torch, "_int_mm"):
        a = torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device)
        try:
            gops = _best_rate(lambda: torch._int_mm(a, b), 2.0 * size**3, sync=sync)
            results["int8"] = {"gflops": round(gops, 1), "how": f"torch._int_mm s8×s8 {size}³"}
        except RuntimeError as exc:  # not every GPU / build has the int8 kernels
            results["int8"] = {"gflops": None, "how": f"torch._int_mm unavailable: {str(exc)[:120]}"}
    return results


def _measure(threads: int | None, device: str) -> dict[str, Any]:
    peaks: dict[str, Any] = {}
    notes: list[str] = []
    if device.startswith("cuda"):
        peaks.update(_torch_peaks(threads, device, GPU_SIZE))
    else:
        try:
            peaks.update(_ort_peaks(threads, CPU_SIZE))
        except ImportError as exc:
            notes.append(f"onnxruntime/onnx peaks skipped: {exc}")
        try:
            torch_peaks = _torch_peaks(threads, device, CPU_SIZE)
        except ImportError as exc:
            notes.append(f"torch peaks skipped: {exc}")
            torch_peaks = {}
        if "bf16" in torch_peaks:
            peaks["bf16"] = torch_peaks["bf16"]
        elif torch_peaks:
            notes.append("bf16 not measured: this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16)")
        if "fp32" in torch_peaks:
            # the fp32 peak is the machine's best fp32 rate; PyTorch's own is kept beside it
            peaks["fp32_torch"] = torch_peaks["fp32"]
            if "fp32" not in peaks or torch_peaks["fp32"]["gflops"] > peaks["fp32"]["gflops"]:
                peaks["fp32"] = torch_peaks["fp32"]
    return {**peaks, "threads": threads, "device": device, "notes": notes}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0]) if args else {}
    result = _measure(spec.get("threads"), spec.get("device", "cpu"))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
