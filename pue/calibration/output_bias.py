"""Bias correction at the vision graph's outputs: the systematic shift quantization adds to the image features, removed.

Quantizing a graph moves its outputs by an error with two parts: one that varies from token to token and a shift that
is the same for every token of every image (its mean). The decoder averages the first away and adds the second up:
a row of several images carries it on every image token at once. Measured (`qwen2_vl gains-few` seed 0, static INT8
for onnxruntime; BENCHMARKS.md, session 23): the quantized vision graph's image features were 3.3 % off the float
ones and 26 % of that error's energy was the shift; single images kept a minimum cosine of 0.997 while rows of four
calibration patches fell to 0.73 (a held-out row of four to 0.977). Removing the shift measured on other patches
lifted those rows to 0.990; the shift alone, added to the float features, took them to 0.976. Neither random noise of
the same size (5 %: 0.995) nor bf16 rounding (0.9996) does it: the shift's coherence does.

The correction (bias correction, Nagel et al. 2019, applied where the decoder reads the features): each float output's
mean error per channel (per DeepStack layer too) over the calibration patches' tokens, the candidate against the
float graph, subtracted by an `Add` on that output. It is measured afresh for each candidate (its ops, rule and
per-token set), on `PATCHES` calibration patches, so every check, the search's decisions and the gate judge the
corrected graph. The decoder is not corrected this way: its output is one normalized row per prompt, whose mean
error is no shift of the next graph's input. `--no-bias-correction` turns it off (diagnostics).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CORRECTED_GRAPHS", "PATCHES", "PREFIX", "correct_outputs", "output_means", "shift_record"]

CORRECTED_GRAPHS = ("vision",)  # graphs whose outputs another graph reads token by token
PATCHES = 32  # calibration patches a shift is measured on (the first of the fit's, in its order)
PREFIX = "pue_bias_"


Moments = dict[str, tuple[np.ndarray, float]]  # per output: its mean per channel, the rms of its rows' norms


def output_means(model: Any | str | Path, feeds: Iterable[dict[str, np.ndarray]]) -> Moments:
    """Each float output's mean over its image tokens (the graph contract's first two axes, batch and tokens) and every
    feed, per channel (and per DeepStack layer, whose axis follows the tokens), float64; and the root mean square of
    its tokens' norms (what a shift is compared with). `model` in memory or a file's path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.type == "tensor(float)"]
    wanted = {i.name for i in session.get_inputs()}
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, float] = {}
    counts: dict[str, int] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, {k: v for k, v in feed.items() if k in wanted}), strict=True):
            # one row per image token: the axes after (batch, tokens) are kept (DeepStack's layers, channels)
            rows = np.asarray(value, np.float64).reshape(-1, *value.shape[2:])
            sums[name] = sums.get(name, 0) + rows.sum(axis=0)
            squares[name] = squares.get(name, 0.0) + float((rows**2).sum())
            counts[name] = counts.get(name, 0) + len(rows)
    return {name: (sums[name] / max(counts[name], 1), (squares[name] / max(counts[name], 1)) ** 0.5) for name in sums}


def correct_outputs(model: Any, shifts: dict[str, np.ndarray]) -> None:
    """`model` rewritten in place so that each named output is what it was minus its shift (per channel): the producer
    writes `{output}_uncorrected` (its other readers in the graph read that), an `Add` of the negated shift writes the
    output."""
    from onnx import helper, numpy_helper

    graph = model.graph
    for output, shift in shifts.items():
        raw = f"{output}_{PREFIX}uncorrected"
        for node in graph.node:
            node.output[:] = [raw if name == output else name for name in node.output]
            node.input[:] = [raw if name == output else name for name in node.input]
        constant = f"{PREFIX}{output}"
        graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), constant))
        graph.node.append(helper.make_node("Add", [raw, constant], [output], name=f"{PREFIX}{output}_add"))


def shift_record(shifts: dict[str, np.ndarray], float_rms: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each corrected output's shift as `fidelity.json` records it: its norm, its largest channel, and its norm over the
    root mean square of the float output's row norms (`relative`)."""
    return {
        name: {
            "norm": float(np.linalg.norm(shift)),
            "max_abs": float(np.abs(shift).max()),
            "relative": float(np.linalg.norm(shift) / max(float_rms.get(name, 0.0), 1e-12)),
        }
        for name, shift in shifts.items()
    }
