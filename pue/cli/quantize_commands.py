"""`pue-export quantize`, `pue-export outliers` and `pue-export floor`: an FP32 bundle → a gated FP16 / INT8 /
INT8-dynamic / bf16 bundle, and before that where its activation outliers sit and how much room its own rounding
floor leaves 8 bits. Registered on `pue-export` by `export_app.py`; thin as it is:
parse, call the library (`pue.calibration`), print."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pue.choices import Attention, CalibrationMethod, QuantizePrecision, Rotate, Target
from pue.cli.common import (
    GATE_MEAN_OPTION,
    GATE_MIN_OPTION,
    GATE_TOP1_OPTION,
    HELDOUT_OPTION,
    console,
    handle_errors,
    print_json,
    progress_printer,
)


@handle_errors
def quantize(
    bundle: Path = typer.Argument(..., help="FP32 bundle to quantize."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle directory to write."),
    precision: QuantizePrecision = typer.Option(..., "--precision", help="Precision of the new bundle."),
    target: Target = typer.Option(
        Target.ONNXRUNTIME.value,
        "--target",
        help="onnxruntime (uint8 activations, x86 CPUs), tensorrt (signed symmetric Q/DQ) or openvino "
        "(--precision bf16: the fp32 graphs with bf16 inference in OpenVINO, gated on a CPU with native bf16; "
        "int8: Q/DQ graphs OpenVINO runs in int8 kernels, gated in OpenVINO; int8-bf16: int8 MatMuls, bf16 elsewhere; "
        "int8-dynamic: int8 weights whose activations OpenVINO quantizes per token at run time; int8-dynamic-bf16: "
        "the same, bf16 elsewhere).",
    ),
    calib: list[Path] = typer.Option(
        None, "--calib", help="Calibration folder or slide (repeat for several); default: the shipped patches."
    ),
    heldout: Path = HELDOUT_OPTION,
    num_patches: int = typer.Option(64, "--num-patches", help="Calibration patches to sample."),
    captions: Path = typer.Option(None, "--captions", help="Text file of captions (one per line) for calibration."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    magnification: float = typer.Option(None, "--magnification", help="Slides: target magnification (e.g. 20)."),
    mpp: float = typer.Option(None, "--mpp", help="Slides: target microns per pixel (e.g. 0.5)."),
    method: CalibrationMethod = typer.Option(
        CalibrationMethod.MINMAX.value, "--calibration-method", help="Static INT8 activation ranges."
    ),
    gate_mean: float = GATE_MEAN_OPTION,
    gate_min: float = GATE_MIN_OPTION,
    gate_top1: float = GATE_TOP1_OPTION,
    no_smooth: bool = typer.Option(False, "--no-smooth", help="Do not migrate activation outliers (diagnostics)."),
    no_fallback: bool = typer.Option(False, "--no-fallback", help="Never keep sensitive layers in float."),
    no_per_token: bool = typer.Option(
        False,
        "--no-per-token",
        help="Never quantize ops per token (int8-dynamic: massive-token inputs, then every op while the check "
        "fails; static int8 for onnxruntime and OpenVINO: every op, last, while the check fails). Diagnostics.",
    ),
    no_error_ranges: bool = typer.Option(
        False,
        "--no-error-ranges",
        help="Static INT8: MinMax activation ranges only (never try ranges chosen by output error; diagnostics).",
    ),
    gptq: bool = typer.Option(
        None,
        "--gptq/--no-gptq",
        help="INT8: also try the int8 weights rounded by GPTQ (each op's output error on calibration tokens kept "
        "small, same grids and kernels; on by default); the calibration check decides.",
    ),
    no_wide_weights: bool = typer.Option(
        False,
        "--no-wide-weights",
        help="INT8 for onnxruntime and OpenVINO: never try 8-bit weights (tried only while the calibration check "
        "fails; onnxruntime: stored as uint8, exact on every CPU, slower kernels than the default 7-bit ones; "
        "OpenVINO: only on a CPU with VNNI or AMX, and such a bundle runs only there).",
    ),
    no_split_channels: bool = typer.Option(
        False,
        "--no-split-channels",
        help="INT8: never try computing in float the residual-stream writers' columns that later RMSNorm gains "
        "amplify (>= 20x the median gain; tried by default where such channels exist, the calibration check decides).",
    ),
    no_bias_correction: bool = typer.Option(
        False,
        "--no-bias-correction",
        help="INT8: do not correct the vision graph's outputs by the mean shift quantization gives them (measured "
        "per candidate on calibration patches; rows of several images add it up). Diagnostics.",
    ),
    rank_ops: int = typer.Option(
        24,
        "--rank-ops",
        help="Ops the float fallback measures end to end (simulated, each one staged and embedded on the check's "
        "16 worst items) before keeping any in float; 0: the SQNR order alone (cheaper on very large models).",
    ),
    balance_budget: float = typer.Option(
        0.05,
        "--balance-budget",
        help="INT8: once the calibration check passes, where one kind of row (texts, images, composed) carries at "
        "least twice the others' error, the share of weight FLOPs that may stay float on the ops that kind needs "
        "most (measured block by block, then op by op; the check decides). 0: never. Needs --rank-ops > 0.",
    ),
    rotate: Rotate = typer.Option(
        Rotate.OFF.value,
        "--rotate",
        help="INT8: rotate the language model's residual stream first (exact in FP32; auto: when its normed "
        "activations carry channel outliers).",
    ),
    attention: Attention = typer.Option(
        None,
        "--attention",
        help="fused (onnxruntime's attention kernels; default for --target onnxruntime INT8) or standard "
        "(the exported MatMul/Softmax/MatMul; TensorRT and FP16 always).",
    ),
    device: str = typer.Option("cpu", "--device", help="Where calibration and the gate run (cpu)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Make an INT8, INT8-dynamic or FP16 bundle calibrated on pathology patches, or a bf16 bundle for OpenVINO,
    gated against FP32."""
    from pue.extras import needs_openslide, require_extras
    from pue.fidelity import FidelityThresholds
    from pue.precisions import PrecisionKind, quantize_spec

    spec = quantize_spec(precision.value, target.value)
    thresholds = FidelityThresholds.with_overrides(gate_mean, gate_min, gate_top1)
    if spec.kind == PrecisionKind.RUNTIME:
        _runtime_precision(bundle, output, spec, thresholds, heldout, device, overwrite, as_json)
        return
    require_extras(
        ["export", "cpu", *([spec.backend] if spec.backend else [])], "pue-export quantize", only={"export": ("onnx",)}
    )
    if slides := needs_openslide(calib or []):
        require_extras(
            ["slides"],
            f"calibrating on {slides[0]} (a whole-slide format only openslide reads)",
            only={"slides": ("openslide",)},
        )
    from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle
    from pue.errors import GateFailedError, PueError

    if device != "cpu":
        raise PueError(
            f"--device {device}: calibration and its gate run on the CPU in this version",
            "quantize on CPU; the int8 graph then runs on GPU through TensorRT (pue-export trt)",
        )
    options = QuantizeOptions(
        precision=precision.value,
        target=target.value,
        calib=list(calib) if calib else None,
        heldout=heldout,
        num_patches=num_patches,
        captions_file=captions,
        seed=seed,
        method=method.value,
        smooth=not no_smooth,
        fallback=not no_fallback,
        per_token=not no_per_token,
        error_ranges=not no_error_ranges,
        **({} if gptq is None else {"gptq": gptq}),
        split_channels=not no_split_channels,
        bias_correction=not no_bias_correction,
        wide_weights=not no_wide_weights,
        rank_ops=rank_ops,
        balance_budget=balance_budget,
        rotate=rotate.value,
        magnification=magnification,
        mpp=mpp,
        thresholds=thresholds,
        attention=None if attention is None else attention.value,
    )
    out = console()
    try:
        result = quantize_bundle(bundle, output, options, overwrite=overwrite, progress=progress_printer(out))
    except GateFailedError as exc:
        _print_fidelity(out, exc.report)
        raise
    report = json.loads((result.bundle / "fidelity.json").read_text())
    if as_json:
        print_json(report)
    else:
        _print_fidelity(out, report)


def _runtime_precision(
    bundle: Path,
    output: Path,
    spec: object,
    thresholds: object,
    heldout: Path | None,
    device: str,
    overwrite: bool,
    as_json: bool,
) -> None:
    """`quantize --precision bf16 --target openvino`: hard-linked fp32 graphs, gated by running OpenVINO here."""
    from pue.calibration.runtime_precision import derive_runtime_precision
    from pue.errors import GateFailedError, PueError
    from pue.extras import require_extras

    require_extras(["openvino"], f"pue-export quantize --precision {spec.precision} --target {spec.target}")
    if device != "cpu":
        raise PueError(f"--device {device}: a {spec.precision} bundle for {spec.target} is gated on the CPU")
    out = console()
    try:
        result = derive_runtime_precision(
            bundle, output, spec, thresholds, heldout, overwrite=overwrite, progress=progress_printer(out)
        )
    except GateFailedError as exc:
        _print_fidelity(out, exc.report)
        raise
    if as_json:
        print_json(result.report)
    else:
        _print_fidelity(out, result.report)


FLOOR_VERDICTS = {  # `pue.calibration.rounding_floor`'s verdict on the parent, as the printed gate says it
    "clear": "passes the gate: the error is the quantizer's",
    "tight": "passes only just: little room for 8 bits",
    "fails": "FAILS the gate: the model itself is rounding-sensitive",
}


def _print_fidelity(out: object, report: dict) -> None:
    from pue.fidelity import print_gate

    extra = []
    if report.get("int8_flop_share") is not None:
        extra.append(("int8 share of weight FLOPs", f"{report['int8_flop_share']:.1%}", ">= 80%"))
    if check := report.get("check"):
        sets = [("calibration check (the search's)", check["overall"])]
        if "unseen" in check:  # confirmed on calibration items the fit did not read (`unseen_check`)
            sets = [
                ("calibration check, fitted items", check["fitted"]),
                ("calibration check, unseen items", check["unseen"]["overall"]),
            ]
        for label, overall in sets:
            extra.append(
                (
                    label,
                    f"mean {overall['mean_cosine']:.5f} / min {overall['min_cosine']:.5f} / top-1 "
                    f"{overall['top1']:.3f}",
                    "",
                )
            )
    extra.append(("ops kept in float", str(len(report.get("float_nodes", []))), ""))
    extra.append(("smoothed op groups", str(len(report.get("smoothed", []))), ""))
    if (report.get("weights") or {}).get("rounding") == "gptq":
        extra.append(("int8 weights rounded by GPTQ", str(report["weights"]["gptq_ops"]), "ops"))
    weights = report.get("weights") or {}
    if weights.get("stored_unsigned"):
        extra.append(("int8 weights", "8-bit, stored as uint8", "u8×u8 kernels (7 bits failed the check)"))
    elif weights.get("widened"):
        extra.append(("int8 weights", "8-bit (7 bits failed the check)", "needs a CPU with VNNI or AMX to run"))
    split = report.get("channel_split") or {}
    if split.get("taken"):
        for graph, done in split["graphs"].items():
            extra.append(
                (f"{graph}: writer columns in float", f"{len(done['writers'])} writers", str(done["channels"]))
            )
    for graph, outputs in (report.get("output_bias") or {}).items():
        for output, shift in outputs.items():
            extra.append(
                (f"{graph}: {output} bias-corrected", f"shift {shift['relative']:.2%} of its rms", "output_bias")
            )
    parity = report.get("target_parity") or {}
    if parity.get("float_nodes"):
        extra.append(
            (f"float: {parity['backend']} ≠ onnxruntime", str(len(parity["float_nodes"])), "ops (target_parity)")
        )
    if report.get("per_token_nodes"):
        how = "by OpenVINO at run time" if report.get("target") == "openvino" else "each row its own scale"
        extra.append(("ops quantized per token", str(len(report["per_token_nodes"])), how))
    if balance := report.get("kind_balance"):
        extra.append(balance_row(balance))
    rotation = report.get("rotation") or {}
    if rotation.get("applied"):
        extra.append(("rotated residual stream", rotation["rotation"]["kind"], f"--rotate {rotation['mode']}"))
    attention = report.get("attention") or {}
    if attention.get("mode") == "fused":
        fused = ", ".join(f"{g} {r['fused']}× {r['op']}" for g, r in attention.get("graphs", {}).items())
        extra.append(("attention", f"fused: {fused}", ""))
    if floor := report.get("rounding_floor"):  # measured where an INT8 gate failed (`rounding_floor`)
        overall = floor["overall"]
        extra.append(
            (
                "the parent in bf16 arithmetic, same items",
                f"mean {overall['mean_cosine']:.5f} / min {overall['min_cosine']:.5f} / top-1 {overall['top1']:.3f}",
                FLOOR_VERDICTS[floor.get("verdict") or ("clear" if floor["passed"] else "fails")],
            )
        )
    title = f"fidelity gate: {report['precision']} ({report['target']}) vs FP32 parent"
    out.print(report["gate_device"])  # type: ignore[attr-defined]
    print_gate(out, report["gate"], title=title, extra_rows=extra)


def balance_row(balance: dict) -> tuple[str, str, str]:
    """The balance stage's row (`kind_balance`): which kind carried how much of the error, what it kept float."""
    ratio = balance["error"] / max(balance["rest_error"], 1e-12)
    if not balance["chosen"]:
        return (f"{balance['kind']}: {ratio:.1f}x the other rows' error", "no op worth its FLOPs", "kind balance")
    error = f"error {balance['error']:.1e} → {balance['check_error']:.1e}"
    verdict = "taken" if balance["taken"] else "not taken (the check was not better)"
    return (
        f"{balance['kind']}: {ratio:.1f}x the other rows' error",
        f"{len(balance['chosen'])} ops float ({balance['chosen_flop_share']:.1%} of FLOPs), {verdict}",
        error,
    )


@handle_errors
def outliers(
    bundle: Path = typer.Argument(..., help="FP32 bundle to examine (before quantizing it)."),
    calib: list[Path] = typer.Option(
        None, "--calib", help="Calibration folder or slide (repeat for several); default: the shipped patches."
    ),
    num_patches: int = typer.Option(16, "--num-patches", help="Calibration patches to run."),
    magnification: float = typer.Option(None, "--magnification", help="Slides: target magnification (e.g. 20)."),
    mpp: float = typer.Option(None, "--mpp", help="Slides: target microns per pixel (e.g. 0.5)."),
    top: int = typer.Option(12, "--top", help="Tensors shown (the worst first)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    rotate: bool = typer.Option(
        False, "--rotate", help="Measure the decoder after rotating its residual stream (as --rotate on would)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print every tensor's measurements as JSON."),
) -> None:
    """Where the bundle's activation outliers are, at the inputs INT8 would quantize (channels and tokens)."""
    from pue.extras import needs_openslide, require_extras

    require_extras(["export", "cpu"], "pue-export outliers", only={"export": ("onnx",)})
    if slides := needs_openslide(calib or []):
        require_extras(
            ["slides"],
            f"reading {slides[0]} (a whole-slide format only openslide reads)",
            only={"slides": ("openslide",)},
        )
    from rich.table import Table

    from pue.calibration.outliers import bundle_outliers

    out = console()
    report = bundle_outliers(
        bundle,
        list(calib) if calib else None,
        num_patches=num_patches,
        seed=seed,
        magnification=magnification,
        mpp=mpp,
        rotate=rotate,
        progress=progress_printer(out),
    )
    if as_json:
        print_json({graph: [t.to_dict() for t in tensors] for graph, tensors in report.items()})
        return
    ranked = sorted((t for tensors in report.values() for t in tensors), key=lambda t: t.worst_ratio, reverse=True)
    table = Table(title="activation outliers at the inputs of weight-bearing ops (max / median)")
    for column in ("graph", "read by", "channels", "channel ratio", "top channels", "token ratio", "top positions"):
        table.add_column(column, justify="right" if "ratio" in column or column == "channels" else "left")
    for tensor in ranked[:top]:
        table.add_row(
            tensor.graph,
            _readers(tensor.readers),
            str(tensor.channels),
            f"{tensor.channel_ratio:.1f}",
            ", ".join(map(str, tensor.top_channels)),
            f"{tensor.token_ratio:.1f}",
            ", ".join(map(str, tensor.top_positions)),
        )
    out.print(table)
    out.print(
        f"{len(ranked)} tensors; {sum(t.channel_ratio >= 20 for t in ranked)} with a channel ratio >= 20, "
        f"{sum(t.token_ratio >= 20 for t in ranked)} with a token ratio >= 20 (a per-tensor INT8 scale set by the "
        "largest value leaves the rest a few levels)"
    )


@handle_errors
def floor(
    bundle: Path = typer.Argument(..., help="FP32 bundle to examine (before quantizing it)."),
    heldout: Path = HELDOUT_OPTION,
    gate_mean: float = GATE_MEAN_OPTION,
    gate_min: float = GATE_MIN_OPTION,
    gate_top1: float = GATE_TOP1_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the measurement as JSON."),
) -> None:
    """The bundle in bf16 arithmetic against itself, on the quantize gate: how much room it leaves 8 bits."""
    from pue.extras import require_extras

    require_extras(["export", "cpu"], "pue-export floor", only={"export": ("onnx",)})
    from pue.calibration.rounding_floor import bundle_floor, floor_reason, share_left
    from pue.fidelity import FidelityThresholds

    out = console()
    thresholds = FidelityThresholds.with_overrides(gate_mean, gate_min, gate_top1)
    record = bundle_floor(bundle, heldout, thresholds)
    if as_json:
        print_json(record)
        return
    overall = record["overall"]
    out.print(
        f"{bundle} in bf16 arithmetic, against itself on the quantize gate's {overall['count']} held-out items: mean "
        f"{overall['mean_cosine']:.5f} / min {overall['min_cosine']:.5f} / top-1 {overall['top1']:.3f}"
    )
    if record["verdict"] == "clear":
        left = share_left(record["headroom"])
        out.print(f"passes, {left} of the gate's cosine allowance left: room for INT8's error (pue-export quantize)")
    else:  # what a failed INT8 gate would say of it
        out.print(floor_reason(record))


def _readers(names: list[str]) -> str:
    shown = names[0] if names else "-"
    return shown if len(names) < 2 else f"{shown} (+{len(names) - 1})"
