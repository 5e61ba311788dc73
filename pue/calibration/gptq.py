"""GPTQ rounding of a MatMul's int8 weights (Frantar et al., 2023): each input row rounded in turn, its rounding error
spread over the rows not yet rounded, weighted by the inverse of the input's second moment on calibration tokens, so
that the output error ‖X·(W − Ŵ)‖ is what is kept small rather than each weight's own error. Same grid as
round-to-nearest (per-output-channel symmetric scales from the float weights' absolute maxima): only which grid point
each weight takes changes, so the kernels, the scales and the graph are as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from onnx import numpy_helper

from pue.calibration.graph_ops import WeightOp

log = logging.getLogger(__name__)

DAMPING = 0.01  # of the mean diagonal, added to X'X: keeps the inverse finite with few tokens or dead channels
BLOCK = 128


def gptq_levels(weight: np.ndarray, scale: np.ndarray, moment: np.ndarray, qmax: int) -> np.ndarray:
    """Integer levels in [−qmax, qmax] for `weight` [K, N] (y = x·W) on the grid `scale` [N], chosen with the input's
    second moment `moment` = E[xᵀx] [K, K] on calibration tokens (`pue.calibration.stats.second_moment`)."""
    # float32 throughout, as GPTQ's reference does: K×K matrices of a 14,336-wide down_proj are 0.8 GB each
    k = weight.shape[0]
    hessian = np.array(moment, np.float32)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian[np.diag_indices(k)] += DAMPING * float(np.mean(np.diag(hessian)))
    try:
        inverse = np.linalg.inv(hessian)
        upper = np.linalg.cholesky((inverse + inverse.T) / 2).T  # Hinv = Uᵀ·U
    except np.linalg.LinAlgError as exc:  # the damped second moment not positive definite in float32: say so
        log.warning("GPTQ: %s; this op's int8 weights keep round-to-nearest", exc)
        return np.clip(np.round(np.asarray(weight, np.float32) / scale), -qmax, qmax).astype(np.int32)
    del hessian, inverse
    work = np.array(weight, np.float32)  # rows of inputs the tokens never reached stay as they are (nearest)
    step = np.asarray(scale, np.float32)
    levels = np.zeros(weight.shape, np.int32)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        errors = np.zeros((stop - start, weight.shape[1]), np.float32)
        for row in range(start, stop):
            chosen = np.clip(np.round(work[row] / step), -qmax, qmax)
            levels[row] = chosen
            error = (work[row] - chosen * step) / upper[row, row]
            work[row + 1 : stop] -= np.outer(upper[row, row + 1 : stop], error)
            errors[row - start] = error
        work[stop:] -= upper[start:stop, stop:].T @ errors
    return levels


def round_weights(
    model: Any,
    ops: list[WeightOp],
    moment_of: Callable[[str], np.ndarray | None],
    float_weight: Callable[[str], np.ndarray],
    cache: dict[tuple, np.ndarray],
) -> list[str]:
    """Re-round, in place, the int8 weights onnxruntime's quantizers wrote for `ops` (`{weight}_quantized` on the
    grid `{weight}_scale`, per output channel, zero point 0: static Q/DQ and dynamic MatMulInteger alike) with GPTQ
    on each op's input second moment `moment_of(node)` (None: the op keeps nearest rounding), within the levels the
    grid already used (±64 where the weights keep 7 bits for CPUs without VNNI). `float_weight(name)` reads a float
    weight; `cache` keeps levels across the search's attempts (same op, same grid). Ops whose weight another op
    shares, or whose weights are not in that form, keep their rounding. Returns the re-rounded ops."""
    initializers = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for op in ops:
        readers[op.weight] = readers.get(op.weight, 0) + 1
    done = []
    for op in ops:
        names = (f"{op.weight}_quantized", f"{op.weight}_scale", f"{op.weight}_zero_point")
        if op.op_type != "MatMul" or readers[op.weight] > 1:
            continue
        if any(name not in initializers for name in names):
            continue
        levels, scale, zero = (numpy_helper.to_array(initializers[name]) for name in names)
        if levels.ndim != 2 or scale.shape != (levels.shape[1],) or np.any(zero != 0):
            continue
        bound = int(np.abs(levels.astype(np.int32)).max())
        key = (op.node, scale.tobytes(), bound)
        if key not in cache:
            moment = moment_of(op.node)
            if moment is None:
                continue
            cache[key] = gptq_levels(float_weight(op.weight), scale, moment, bound).astype(levels.dtype)
        initializers[names[0]].CopyFrom(numpy_helper.from_array(cache[key], names[0]))
        done.append(op.node)
    return done


def weight_reader(model: Any, base_dir: Path) -> Callable[[str], np.ndarray]:
    """Reads one float weight of `model` at a time (loaded without its weights: they lie under `base_dir`)."""
    initializers = {init.name: init for init in model.graph.initializer}
    return lambda name: numpy_helper.to_array(initializers[name], base_dir=str(base_dir)).astype(np.float32)


__all__ = ["gptq_levels", "round_weights", "weight_reader"]
