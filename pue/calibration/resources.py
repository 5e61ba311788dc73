"""Quantization's own resource plan: peak memory and calibration passes, from the graphs and the options.

`pue-export onnx` prints its plan before exporting; `pue-export quantize` does the same before calibrating, and
refuses when the plan does not fit the memory this machine has free. The plan is a model with physical terms, each
read off the graphs, and coefficients fitted to peaks measured phase by phase (`PhasePeaks`):

- W, the FP32 weights (the graphs' initializers, from the manifest's file sizes): the parent's onnxruntime sessions
  and the loaded ONNX protobufs hold them for the whole run (``WEIGHT_COPIES_RESIDENT`` x W); the graph being
  measured is copied, serialised and loaded into a session on top (``WEIGHT_COPIES_WORKING`` x W_g);
- S_g, the attention scores of one row (heads x tokens² x 4 bytes, per crop in the vision tower, summed over the
  graph's attention layers, counted as its Softmax nodes), and its largest layer's share S_layer. The parent embeds
  the gate set first (batches of the bundle's batch size; image sets batch with sets of their own size), and
  onnxruntime keeps the arena that took (``RUNTIME_SCORE_COPIES`` x the largest batch's scores of one layer, for the
  rest of the run); each candidate the search checks grows one
  of its own (``CANDIDATE_ARENA_SHARE`` of that);
- A_g, the activations of one calibration row at the inputs of the ops that get quantized (tokens x channels x 4
  bytes, summed over those inputs), which the statistics pass fetches (``ACTIVATION_COPIES`` x A_g, plus
  ``STATISTICS_SCORE_COPIES`` x S_g of its unoptimised session); static calibration's session keeps more tensors of
  the scores' size per layer (``CALIBRATION_SCORE_COPIES`` x S_g);
- the interpreter and its libraries (``PROCESS_BASE_BYTES``);
- what the INT8 search holds on top, in copies of all the weights W: while it quantizes and checks candidates
  (``SEARCH_WEIGHT_COPIES``: the float graphs' protobufs, onnxruntime's
  quantizer's own model and its output, the best candidate so far, the staged candidate's sessions), and, when the
  float fallback ranks ops end to end, during that ranking (``RANKING_WEIGHT_COPIES``: the simulated candidate and
  the one graph it changes per op, their serialisation, the staged session).

Fitted on this repository's `ci`, `e5v` and `bench` presets (attention-bound: 1,176 image tokens per patch) and on
the weight-bound Qwen3-VL-2B-shaped `bench` preset (365 M parameters, 64 image tokens), BENCHMARKS.md
"Quantization's resource plan": the plan is 14-40 % above every measured peak. Every quantize run records its
measured peaks next to the plan in `fidelity.json` (`resources`), so the model can be checked on any checkpoint.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pue.runtime.cpu import GiB, available_memory_bytes

PROCESS_BASE_BYTES = 150 * 1024**2
WEIGHT_COPIES_RESIDENT = 2.0
WEIGHT_COPIES_WORKING = 3.0
ACTIVATION_COPIES = 2.0
STATISTICS_SCORE_COPIES = 1.5
CALIBRATION_SCORE_COPIES = 7.0
RUNTIME_SCORE_COPIES = 9.0
CANDIDATE_ARENA_SHARE = 0.6
SEARCH_WEIGHT_COPIES = 3.5
RANKING_WEIGHT_COPIES = 4.5
MARGIN = 1.15


@dataclass
class GraphLoad:
    """What one graph brings to the plan."""

    weights_bytes: int
    activation_bytes_per_row: int  # at the inputs of the ops that get quantized, for one calibration row
    attention_bytes_per_row: int  # attention scores of one row, summed over the graph's attention layers
    attention_layers: int
    rows_per_pass: int  # calibration rows one pass over this graph feeds

    @property
    def layer_attention_bytes(self) -> int:
        return self.attention_bytes_per_row // max(1, self.attention_layers)


@dataclass
class QuantizePlan:
    precision: str
    graphs: dict[str, GraphLoad]
    batch_attention_bytes: int  # attention scores of the largest batch the gate embeds, one layer
    passes: dict[str, int]  # what runs over the calibration rows, and how often at most
    gate_items: int
    peak_host_bytes: int
    available_host_bytes: int | None
    fits: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        weights = ", ".join(f"{name} {_size(g.weights_bytes)}" for name, g in self.graphs.items())
        per_row = ", ".join(
            f"{name} {_size(g.activation_bytes_per_row)} + {_size(g.attention_bytes_per_row)} of attention scores"
            for name, g in self.graphs.items()
        )
        rows = ", ".join(f"{name} {g.rows_per_pass}" for name, g in self.graphs.items())
        passes = ", ".join(f"{what} {count}" for what, count in self.passes.items())
        return [
            f"weights: {weights}",
            f"per calibration row: {per_row}",
            f"calibration rows per pass: {rows}",
            f"passes over them (at most): {passes}; {self.gate_items} held-out gate items",
            f"expected peak RAM: {_size(self.peak_host_bytes)} of {_size(self.available_host_bytes)} free",
            "fits this machine: " + ("yes" if self.fits else "NO"),
            *self.notes,
        ]


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / GiB:.2f} GB" if n >= GiB else f"{n / 1024**2:,.0f} MB"


def activation_bytes(ops: list[Any], tokens: int) -> int:
    """float32 bytes of the distinct activations that `ops` (WeightOps of one graph) read, for one row."""
    channels = {op.activation: op.in_channels for op in ops}
    return int(4 * tokens * sum(channels.values()))


def attention_bytes(heads: int, tokens: int, layers: int, sequences: int = 1) -> int:
    """float32 bytes of the attention scores of one row: `sequences` (vision crops) x heads x tokens², per layer."""
    return int(4 * sequences * heads * tokens * tokens * layers)


def max_attempts(op_count: int, variants: int = 0, gptq: bool = False) -> int:
    """Candidates the search checks at most: all int8, the `variants` tried before the fallback (per token, float
    readers of massive tokens, error-chosen ranges, the patch Conv in float), then 1, 2, 4, … ops kept in float; with
    GPTQ, the baseline with GPTQ weights and each later candidate once more with the other rounding."""
    later = variants + (math.floor(math.log2(op_count)) + 1 if op_count else 0)
    return 1 + (1 + 2 * later if gptq else later)


def plan_quantize(
    precision: str,
    graphs: dict[str, GraphLoad],
    *,
    calibrated: bool,
    fallback: bool,
    op_count: int,
    outlier_rows: int,
    gate_items: int,
    batch_attention_bytes: int,
    available: int | None = None,
    ranked_ops: int = 0,
    every_row_calibrates: bool = True,
    variants: int = 0,
    gptq: bool = False,
    balance_measures: int = 0,
) -> QuantizePlan:
    """Peak host memory and the passes over calibration rows of one `pue-export quantize` run. `ranked_ops`: how
    many ops the float fallback measures end to end (`--rank-ops`; 0: none, or no fallback).
    `every_row_calibrates`: static INT8's calibration session runs every row (onnxruntime's histogram methods); with
    pue's own ranges (`--calibration-method minmax`) it runs one, and the statistics pass is the larger. `variants`,
    `gptq`: what the search tries besides the fallback (`max_attempts`). `balance_measures`: the most simulated
    candidates the balance stage measures (`kind_balance`; 0: it does not run), plus its one real candidate."""
    arena = RUNTIME_SCORE_COPIES * batch_attention_bytes
    weights = sum(g.weights_bytes for g in graphs.values())
    resident = PROCESS_BASE_BYTES + WEIGHT_COPIES_RESIDENT * weights + arena
    copies = CALIBRATION_SCORE_COPIES if calibrated and every_row_calibrates else STATISTICS_SCORE_COPIES
    working = max(
        WEIGHT_COPIES_WORKING * g.weights_bytes
        + ACTIVATION_COPIES * g.activation_bytes_per_row
        + copies * g.attention_bytes_per_row
        for g in graphs.values()
    )
    phases = [working, CANDIDATE_ARENA_SHARE * arena]
    ranked = ranked_ops if fallback and precision != "fp16" else 0
    if precision != "fp16":
        phases.append(SEARCH_WEIGHT_COPIES * weights + CANDIDATE_ARENA_SHARE * arena)
    if ranked:
        phases.append(RANKING_WEIGHT_COPIES * weights + CANDIDATE_ARENA_SHARE * arena)
    peak = int(MARGIN * (resident + max(phases)))
    balance = balance_measures if fallback and precision != "fp16" else 0
    attempts = max_attempts(op_count if fallback else 0, variants, gptq) + int(balance > 0)
    if precision == "fp16":
        passes = {"outlier report": 1, "activation ranges": 1, "gate": 1}
    else:
        passes = {"outlier report": 1, "statistics": 1, **({"calibration": attempts} if calibrated else {})}
        # at most every check again on the calibration items the fit did not read (`unseen_check`: the taken
        # candidate, then every one once its confirmation failed)
        passes.update({"calibration check": attempts, "unseen check": attempts})
        passes.update({"fallback ranking": ranked + 1} if ranked else {})
        passes.update({"kind balance": balance} if balance else {})
        passes["held-out gate"] = 1
        passes["rounding floor, if the gate fails"] = 1  # the parent in bf16 on the gate's items (`rounding_floor`)
    available = available_memory_bytes() if available is None else available
    fits = available is None or peak <= available
    notes = [f"(the outlier report reads the first {outlier_rows} rows of each graph)"]
    if not fits:
        lighter = "use --precision int8-dynamic (no calibration sessions), " if calibrated else ""
        notes.append(
            f"this quantization needs more RAM than is free: {lighter}close other programs, or run it on a machine "
            "with more memory"
        )
    return QuantizePlan(precision, graphs, batch_attention_bytes, passes, gate_items, peak, available, fits, notes)


class PhasePeaks:
    """Peak resident memory of each phase of a run (Linux: VmHWM, reset between phases; else the running max)."""

    def __init__(self) -> None:
        self.peaks_mb: dict[str, float] = {}
        self._resettable = _reset_peak()

    def end(self, phase: str) -> None:
        """Record the peak since the previous `end` (or the start) under `phase`, then reset it."""
        peak = _peak_bytes(self._resettable)
        if peak is not None:
            self.peaks_mb[phase] = round(max(self.peaks_mb.get(phase, 0.0), peak / 1024**2), 1)
        self._resettable = _reset_peak()

    def overall_mb(self) -> float | None:
        return max(self.peaks_mb.values(), default=None)


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux ≥ 4.0: `5` to /proc/self/clear_refs); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_bytes(resettable: bool) -> int | None:
    if resettable:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


__all__ = [
    "GraphLoad",
    "PhasePeaks",
    "QuantizePlan",
    "activation_bytes",
    "attention_bytes",
    "max_attempts",
    "plan_quantize",
]
