"""`pue-export quantize`: an FP32 bundle → an INT8 / INT8-dynamic / FP16 bundle that passed the fidelity gate.

INT8: per-channel symmetric int8 weights on weight-bearing ops only (attention's activation×activation
products, the mask path, norms and pooling stay float); outlier channels migrated into the weights
(SmoothQuant-style) where they would ruin a per-tensor activation scale; then, while the gate fails, the
layers with the worst simulated int8 SQNR are kept in float — never below 80 % of the weight FLOPs in int8.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pue.bundle import Manifest, read_manifest
from pue.calibration.candidates import MIN_INT8_FLOP_SHARE, flop_share_check
from pue.calibration.check_items import (
    UNSEEN_PATCHES,
    calibration_captions,
    check_captions,
    check_disjoint,
    check_gate_set,
    check_row_keys,
)
from pue.calibration.check_rows import CheckRows
from pue.calibration.fidelity_plot import plot_fidelity
from pue.calibration.fp16 import convert_with_gate
from pue.calibration.int8_search import Judges, search_int8
from pue.calibration.kind_balance import DEFAULT_BUDGET
from pue.calibration.openvino_int8 import check_openvino_request
from pue.calibration.quantize_plan import OUTLIER_SAMPLES, most_images_per_row, run_plan, vision_tokens
from pue.calibration.quantized_manifest import child_manifest, gate_device
from pue.calibration.reference import choose_reference
from pue.calibration.resources import PhasePeaks
from pue.calibration.rounding_floor import floor_reason, measure_floor
from pue.calibration.row_split_hoist import hoist_for_target
from pue.calibration.staging import Staged, VisionMemo, evaluate_staged
from pue.calibration.target_parity import parity_for
from pue.choices import (
    Attention,
    BundleTarget,
    CalibrationMethod,
    Precision,
    QuantizePrecision,
    Rotate,
    parse_choice,
)
from pue.derive import derive_bundle
from pue.errors import PueError
from pue.fidelity import FidelityThresholds, GateReport
from pue.gate_set import GateSet
from pue.precisions import PrecisionSpec, lookup, quantize_spec
from pue.runtime.cpu import saturating_u8s8

log = logging.getLogger(__name__)

PRECISIONS = QuantizePrecision.values()


@dataclass
class QuantizeOptions:
    precision: str
    target: str = "onnxruntime"
    calib: list[Path] | None = None
    heldout: Path | None = None
    num_patches: int = 64
    num_captions: int = 32
    captions_file: Path | None = None
    seed: int = 0
    method: str = "minmax"
    smooth: bool = True
    rotate: str = "off"  # "auto" | "on" | "off": rotate the decoder's residual stream first (INT8 only)
    fallback: bool = True
    error_ranges: bool = True  # static INT8 (MinMax): also try ranges chosen by output error (`ranges`), if better
    gptq: bool = True  # INT8: also try the int8 weights rounded by GPTQ (`gptq`), taken if the check is better
    # INT8 for onnxruntime: while the check fails, also try 8-bit weights stored as uint8 (`weight_storage`)
    wide_weights: bool = True
    # INT8: also try the residual-stream writers' columns that later norm gains amplify in float (`channel_split`)
    split_channels: bool = True
    # int8-dynamic: inputs carrying massive tokens may quantize per token (checked, not assumed); static INT8 keeps them
    # float instead, as part of the fallback (`PrecisionSpec.token_outliers`)
    per_token: bool = True
    # the float fallback's end-to-end ranking: how many of the SQNR ranking's worst ops it measures (0: SQNR order)
    rank_ops: int = 24
    # INT8: once the check passes, the share of weight FLOPs that may stay float where one kind of row carries most of
    # the error (`kind_balance`; 0: never)
    balance_budget: float = DEFAULT_BUDGET
    # INT8: the vision graph's outputs corrected by the mean shift quantization gives them (`output_bias`)
    bias_correction: bool = True
    magnification: float | None = None
    mpp: float | None = None
    thresholds: FidelityThresholds = field(default_factory=FidelityThresholds)
    attention: str | None = None  # "fused" | "standard"; None: the precision's default (fused for onnxruntime INT8)

    @property
    def spec(self) -> PrecisionSpec:
        """The table's entry for this precision and target (validated; fp16's graphs serve any target)."""
        return quantize_spec(self.precision, self.target)


@dataclass
class QuantizeResult:
    bundle: Path
    fidelity: GateReport
    float_nodes: list[str]
    int8_flop_share: float | None
    smoothed: list[dict]
    attempts: list[dict]
    timings: dict[str, float]


def _check_request(manifest: Manifest, options: QuantizeOptions) -> None:
    parse_choice(QuantizePrecision, options.precision, "precision")
    if manifest.precision != Precision.FP32:
        raise PueError(
            f"the bundle is already {manifest.precision} (lineage: {manifest.lineage.parent_sha256 or 'root'})",
            "quantize its FP32 parent bundle instead",
        )
    spec = options.spec
    check_openvino_request(spec)  # OpenVINO-target INT8: openvino installed, bf16 only where the CPU has it
    parse_choice(CalibrationMethod, options.method, "--calibration-method")
    if options.method != CalibrationMethod.MINMAX:
        if not spec.calibrated:
            raise PueError(f"--calibration-method {options.method} only applies to static int8")
        log.warning(
            "%s calibration keeps histograms of every calibrated tensor: expect several GB of memory, and "
            "it fails on graphs whose mask path holds -inf",
            options.method,
        )
    parse_choice(Rotate, options.rotate, "--rotate")
    if options.rotate == Rotate.ON and spec.qdq is None:
        raise PueError(f"--rotate on prepares INT8 activations; {options.precision} has none", "use --rotate off")
    if options.num_patches < 1:
        raise PueError(f"--num-patches must be at least 1, got {options.num_patches}")
    if options.rank_ops < 0:
        raise PueError(f"--rank-ops must be 0 or more, got {options.rank_ops}")
    if not 0 <= options.balance_budget <= 1 - MIN_INT8_FLOP_SHARE:
        raise PueError(
            f"--balance-budget is a share of the weight FLOPs between 0 and {1 - MIN_INT8_FLOP_SHARE:.2f} (an INT8 "
            f"bundle keeps {MIN_INT8_FLOP_SHARE:.0%} in int8), got {options.balance_budget}"
        )
    if options.attention is not None:
        parse_choice(Attention, options.attention, "--attention")
    if options.attention is not None and options.attention not in spec.attention:
        raise PueError(
            f"--attention fused writes onnxruntime contrib ops; a {options.precision} bundle for target "
            f"'{_target(options)}' must keep standard ONNX attention",
            "use --attention standard (TensorRT fuses attention itself when it builds the engine)",
        )


def attention_mode(options: QuantizeOptions) -> str:
    """fused (onnxruntime's attention kernels) or standard (the exported MatMul/Softmax/MatMul)."""
    if options.attention is not None:
        return options.attention
    return options.spec.default_attention


def _attention_layouts(manifest: Manifest, options: QuantizeOptions) -> dict[str, dict[str, Any]] | None:
    from pue.optimize.attention import attention_layout

    if attention_mode(options) != Attention.FUSED:
        return None
    return {name: attention_layout(manifest.export, name) for name in manifest.graphs}


def quantize_bundle(
    bundle: str | Path,
    output: str | Path,
    options: QuantizeOptions,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> QuantizeResult:
    import onnx

    from pue.calibration.readers import DecoderFeeds, VisionFeeds, VisionOutputs, make_plan
    from pue.calibration.sampling import sample_check_patches, sample_patches
    from pue.calibration.sources import open_sources
    from pue.runtime import Embedder

    say = progress or (lambda message: log.info(message))
    peaks = PhasePeaks()
    parent_dir = Path(bundle)
    _check_request(read_manifest(parent_dir), options)
    timings: dict[str, float] = {}

    with (
        derive_bundle(parent_dir, output, overwrite=overwrite) as child,
        tempfile.TemporaryDirectory(prefix=".pue-quantize-", dir=Path(output).absolute().parent) as scratch,
    ):
        parent_manifest, staging, work = child.parent, child.staging, Path(scratch)
        layouts = _attention_layouts(parent_manifest, options)
        started = time.perf_counter()
        sources = open_sources(
            options.calib, patch_size=parent_manifest.tile_size, magnification=options.magnification, mpp=options.mpp
        )
        patches, sampling = sample_patches(sources, options.num_patches, seed=options.seed)
        captions = calibration_captions(options)
        plan = make_plan(patches, captions, seed=options.seed)
        say(f"calibration set: {plan.counts()} from {len(sources)} source(s)")
        check_patches, sampling["check"] = sample_check_patches(
            sources, patches, min(UNSEEN_PATCHES, len(patches)), seed=options.seed
        )
        check_plan = make_plan(check_patches, check_captions(options, captions), seed=options.seed)
        parent = Embedder.load(parent_dir)
        gate_set = GateSet.default(options.heldout)
        check_disjoint(gate_set, patches + check_patches)
        say(f"gate set: {gate_set.counts()}")
        models = {name: onnx.load(str(parent_dir / spec.file.path)) for name, spec in parent_manifest.graphs.items()}
        vision_outputs = VisionOutputs()  # the parent's vision outputs per patch, for the decoder's feeds
        feeds = {
            "vision": lambda limit=None: VisionFeeds(parent, plan.patches, limit),
            "decoder": lambda limit=None: DecoderFeeds(parent, plan, limit, vision_outputs),
        }
        tokens = {"vision": vision_tokens(parent_manifest), "decoder": len(parent.prompts.image_prompt())}
        images_per_row, set_rows = most_images_per_row(parent, gate_set, plan)
        resources = run_plan(parent_manifest, models, feeds, tokens, (images_per_row, set_rows), gate_set, options)
        for line in resources.lines():
            say(f"plan: {line}")
        if not resources.fits:
            raise PueError("the quantization's resource plan does not fit this machine", resources.notes[-1])
        check_set = check_gate_set(plan)
        say(f"calibration check set (every search decision): {check_set.counts()}")
        reference_rows, reference_record = choose_reference(
            parent, (parent_dir, parent_manifest), layouts, work / "reference", check_set, say
        )
        (reference,) = reference_rows(gate_set)
        # the check items are calibration rows: their parent rows come from the statistics pass (`check_rows`)
        check_rows = CheckRows(check_set, check_row_keys(plan), lambda items: reference_rows(items)[0], parent)
        unseen_set = check_gate_set(check_plan)
        say(
            f"unseen check set (confirms the passing candidate taken): {unseen_set.counts()}, patches: "
            f"{sampling['check']['unseen']} the fit did not read, {sampling['check']['transformed']} fitted ones "
            "turned or mirrored"
        )
        unseen_reference: dict[str, Any] = {}  # the parent's rows, embedded at the first confirmation
        timings["prepare_s"] = time.perf_counter() - started
        peaks.end("prepare")

        outliers = _outliers(models, feeds)
        peaks.end("outlier report")
        threshold = outliers["threshold"]
        say(
            f"outliers: {outliers['channel_outlier_tensors']} activations with a channel ratio >= {threshold:g}, "
            f"{outliers['token_outlier_tensors']} with a token ratio >= {threshold:g}"
        )
        rotation = _rotate(models, parent_dir / parent_manifest.graphs["decoder"].file.path, feeds, options, say)
        if rotation.get("applied"):
            peaks.end("rotation")
        hoisted = hoist_for_target(models, options.spec.backend, say) if options.spec.calibrated else None
        fusion: dict[str, dict] = {}

        def evaluate(
            candidate: dict[str, Any],
            items: GateSet = gate_set,
            parent_rows: dict = reference,
            thresholds: FidelityThresholds = options.thresholds,
        ) -> GateReport:
            """Stage the candidate's graphs as a bundle (the last one staged is what gets written) and measure it on
            `items` (the held-out gate set unless told otherwise) against the parent's rows.

            With fused attention the gate measures the fused graphs: what is gated is what ships.
            """
            if layouts is not None:
                candidate = _fuse(candidate, layouts, fusion)
            staged.clear()
            return evaluate_staged(candidate, child, items, parent_rows, options.spec, thresholds, memo=memo)

        check_thresholds = options.thresholds.for_check()
        staged = Staged()
        memo = VisionMemo()  # a candidate's vision graph unchanged (the balance attempt): its outputs not run again
        float_spec = simulation_spec(options.spec)  # simulated graphs are float graphs, run by onnxruntime

        def rank(simulated: dict[str, Any], indices: list[int]) -> GateReport:
            """Simulated graphs (Q/DQ in float arithmetic, unfused) on the check items at `indices`."""
            items, rows = check_set.select(check_rows.rows(), indices)
            return evaluate_staged(simulated, child, items, rows, float_spec, check_thresholds, simulated=staged)

        def confirm(candidate: dict[str, Any]) -> GateReport:
            """A candidate the search would take, on calibration items the fit did not read."""
            if not unseen_reference:
                unseen_reference.update(reference_rows(unseen_set)[0])
            return evaluate(candidate, unseen_set, unseen_reference, check_thresholds)

        judges = Judges(
            check=lambda candidate: evaluate(candidate, check_set, check_rows.rows(), check_thresholds),
            confirm=confirm if len(unseen_set.images) else None,
            gate=evaluate,
            rank=rank if options.rank_ops > 0 else None,
            parity=parity_for(options.spec, feeds, work) if options.spec.calibrated else None,
        )

        child.link_from_parent(parent_manifest.tokenizer.file.path)
        if options.spec.qdq is None:
            outcome = convert_with_gate(models, feeds, options, evaluate, say, timings)
            peaks.end("conversion and gate")
        else:
            heads = dict(parent_manifest.export.attention)
            observers = {"vision": vision_outputs.observe, "decoder": check_rows.observe}  # the statistics pass's
            outcome = search_int8(
                models, feeds, tokens, work, options, judges, say, timings, peaks.end, heads, observers
            )
        fidelity, attempts = outcome["fidelity"], outcome["attempts"]
        parity = outcome.get("target_parity") or {}
        share = outcome.get("share")
        rule = None if share is None else flop_share_check(share, parity.get("float_nodes", []), parity.get("backend"))
        if rule is not None:  # a bundle called INT8 keeps 80 % of its weight FLOPs in int8 (DESIGN.md)
            fidelity.checks.append(rule)
            outcome["why"] = [*(outcome.get("why") or fidelity.failures()[:-1]), rule.describe()]
        floor = None
        if options.spec.qdq is not None and not fidelity.passed:  # the quantizer's error, or the model's own?
            paths = {name: parent_dir / spec.file.path for name, spec in parent_manifest.graphs.items()}
            models.clear()  # the failed candidate's graphs: nothing reads them again, the parent's take their place
            floor = measure_floor(  # float graphs, staged and run as the ranking's simulated ones are
                paths,
                lambda graphs: evaluate_staged(
                    graphs, child, gate_set, reference, float_spec, options.thresholds, staged
                ),
                say,
            )
            outcome["why"] = [*(outcome.get("why") or fidelity.failures()), floor_reason(floor)]
        report = {
            "precision": options.precision,
            "target": _target(options),
            "gate": fidelity.to_dict(),
            "attempts": attempts,
            "check": outcome.get("check"),
            "float_nodes": outcome.get("float_nodes", []),
            "per_token_nodes": outcome.get("per_token_nodes", []),
            "int8_flop_share": outcome.get("share"),
            "smoothed": outcome.get("smoothed", []),
            "ranges": outcome.get("ranges"),
            "weights": outcome.get("weights"),
            "channel_split": outcome.get("channel_split"),
            "output_bias": outcome.get("output_bias"),
            "attention": {"mode": attention_mode(options), "graphs": fusion},
            "reference": {**reference_record, "check_rows": check_rows.record or None},
            "sensitivity": outcome.get("ranking", [])[:20],
            "measured_ranking": outcome.get("measured_ranking", []),
            "kind_balance": outcome.get("kind_balance"),
            "target_parity": outcome.get("target_parity"),
            "row_split_hoist": hoisted,
            "fp16_kept_fp32": outcome.get("fp16_blocked", []),
            "outliers": outliers,
            "resources": {"plan": resources.to_dict(), "measured_peak_mb": peaks.peaks_mb},
            "rotation": rotation,
            "rounding_floor": floor,
            "gate_device": gate_device(options.spec)
            + (
                "; this CPU's int8 kernels saturate on full-range s8 weights, so the Q/DQ pairs ran in float, the "
                "arithmetic TensorRT runs"
                if options.spec.qdq is not None and options.spec.qdq.scheme == "s8" and saturating_u8s8()
                else ""
            )
            + (
                "; onnxruntime on CPU computes FP16 ops in FP32, so this gate cannot reveal FP16 overflow: ops whose "
                "calibrated |activation| exceeds 16,000 were kept FP32"
                if options.precision == Precision.FP16
                else ""
            ),
        }
        details = {k: v for k, v in report.items() if k != "gate"}
        child.gate(fidelity, "fidelity gate", details, reasons=outcome.get("why"))
        calibration = {
            "sources": [s.name for s in sources],
            "sampling": sampling,
            "patches": [p.to_dict() for p in plan.patches],
            "captions": plan.captions,
            "composed": [{"patch": p.to_dict(), "modifier": m} for p, m in plan.composed],
            "image_sets": [[p.to_dict() for p in patches] for patches in plan.image_sets],
            "check": {
                "patches": [p.to_dict() for p in check_plan.patches],
                "captions": check_plan.captions,
                "counts": check_plan.counts(),
            },
            "seed": options.seed,
            "counts": plan.counts(),
            "method": options.method,
        }
        extra_files = ["calibration.json", "fidelity.json"]
        child.write_json("calibration.json", calibration)
        child.write_json("fidelity.json", report)
        if plot_fidelity(report, staging / "fidelity.png"):
            extra_files.append("fidelity.png")
        child.commit(child_manifest(child, options, report), extra_files)
    say(f"wrote {output}")
    return QuantizeResult(
        Path(output),
        fidelity,
        outcome.get("float_nodes", []),
        outcome.get("share"),
        outcome.get("smoothed", []),
        attempts,
        timings,
    )


def simulation_spec(spec: PrecisionSpec) -> PrecisionSpec:
    """The entry simulated candidates (Q/DQ computed in float, `pue.calibration.simulate`) are staged with: the
    precision's onnxruntime entry, or INT8's where it has none (int8-bf16, whose float rest the ranking computes in
    fp32: it ranks ops by their int8 error, which bf16 does not change)."""
    return lookup(spec.precision, BundleTarget.ONNXRUNTIME) or quantize_spec(Precision.INT8, BundleTarget.ONNXRUNTIME)


def _outliers(models: dict[str, Any], feeds: dict[str, Callable[..., Any]]) -> dict[str, Any]:
    """Where the FP32 graphs' activation outliers are, on the first calibration rows (before any rewrite)."""
    from pue.calibration.graph_ops import weight_ops
    from pue.calibration.outliers import collect_outliers, summarize

    tensors = []
    for name, model in models.items():
        tensors += collect_outliers(model, weight_ops(model, name), feeds[name](OUTLIER_SAMPLES))
    return summarize(tensors)


def _rotate(
    models: dict[str, Any], decoder_path: Path, feeds: dict[str, Callable[..., Any]], options: QuantizeOptions, say: Any
) -> dict[str, Any]:
    """`--rotate`: the language model's residual stream rotated in the FP32 decoder before calibration."""
    from pue.calibration.rotation import rotate_for_int8

    if options.spec.qdq is None:  # FP16: nothing to prepare (`--rotate on` was refused before any work)
        return {"mode": options.rotate, "applied": False}
    record = rotate_for_int8(models, decoder_path, feeds["decoder"], options.rotate, seed=options.seed)
    if record["applied"]:
        say(
            f"rotation: decoder residual stream ({record['rotation']['kind']}, width {record['rotation']['width']}); "
            f"normed channel ratio {record['channel_ratio_before']:.1f} -> {record['channel_ratio_after']:.1f}, "
            f"FP32 check min cosine {record['rotation']['check_min_cosine']:.7f}"
        )
    return record


def _fuse(models: dict[str, Any], layouts: dict[str, dict[str, Any]], record: dict[str, dict]) -> dict[str, Any]:
    from pue.optimize.attention import fuse_attention

    fused = {}
    for name, model in models.items():
        fused[name], summary = fuse_attention(model, name, layouts[name])
        record[name] = summary.to_dict()
    return fused


def _target(options: QuantizeOptions) -> str:
    return options.spec.target


__all__ = ["PRECISIONS", "QuantizeOptions", "QuantizeResult", "quantize_bundle"]
