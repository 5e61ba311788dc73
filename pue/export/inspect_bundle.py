"""`pue-export inspect`: a readable summary of a bundle, after verifying every file against its sha256."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pue.bundle import manifest_sha256, read_manifest, verify_files


def _fidelity_report(root: Path, manifest: Any) -> dict[str, Any]:
    """A derived bundle's fidelity.json ({} for bundles without one)."""
    import json

    if "fidelity.json" not in manifest.files:
        return {}
    return json.loads((root / "fidelity.json").read_text())


def _treatment(report: dict[str, Any]) -> dict[str, Any] | None:
    """What INT8 did to the op groups (None for bundles without an INT8 search): kept float, per token, smoothed (with
    which migration strength, and where 1/s went: an exact fold or an inserted Mul), the activation ranges (clipped
    by output error, per tensor), the rotation, the writers' amplified columns (and the readers' rows) computed in
    float, the Reshapes moved for OpenVINO, the vision outputs' bias correction."""
    if "float_nodes" not in report:
        return None
    split = report.get("channel_split") or {}
    return {
        "float_nodes": report.get("float_nodes", []),
        "per_token_nodes": report.get("per_token_nodes", []),
        "smoothed": [
            {
                "nodes": g["nodes"],
                "alpha": g["alpha"],
                "fold": g.get("fold", "folded" if g.get("folded_into") else "mul"),
            }
            for g in report.get("smoothed", [])
        ],
        "ranges": report.get("ranges"),
        "rotated": bool((report.get("rotation") or {}).get("applied")),
        # ops kept float because the target backend computes them differently from onnxruntime (`target_parity`)
        "target_float_nodes": (report.get("target_parity") or {}).get("float_nodes", []),
        # ops kept float once the check passed because one kind of row carried most of the error (`kind_balance`)
        "balance_float_nodes": _balance_nodes(report.get("kind_balance")),
        "kind_balance": report.get("kind_balance"),
        "channel_split": {
            graph: {
                "channels": done["channels"],
                "writers": done["writers"],
                "readers": ((split.get("reader_graphs") or {}).get(graph) or {}).get("readers", [])
                if split.get("readers_taken")
                else [],
            }
            for graph, done in (split.get("graphs") or {}).items()
        }
        if split.get("taken")
        else {},
        # the vision graph's outputs corrected by the mean shift quantization gave them (`output_bias`)
        "output_bias": report.get("output_bias") or {},
        # weight ops whose row-splitting Reshape was moved to their input for OpenVINO (`row_split_hoist`)
        "row_split_hoist": {graph: done["ops"] for graph, done in (report.get("row_split_hoist") or {}).items()},
    }


def describe_bundle(bundle: str | Path) -> dict[str, Any]:
    root = Path(bundle)
    manifest = read_manifest(root)
    verify_files(root, manifest, check_hashes=True)  # raises BundleError naming the first bad file
    graphs = {}
    for name, graph in manifest.graphs.items():
        size = graph.file.size + sum(entry.size for entry in graph.external_data)
        graphs[name] = {
            "file": graph.file.path,
            "external_data": [entry.path for entry in graph.external_data],
            "size_bytes": size,
            "inputs": [f"{t.name} {t.dtype} {t.shape}" for t in graph.inputs],
            "outputs": [f"{t.name} {t.dtype} {t.shape}" for t in graph.outputs],
        }
    gate = manifest.fidelity.get("parity_gate") or manifest.fidelity.get("gate") or {}
    report = _fidelity_report(root, manifest)
    return {
        "bundle": str(root),
        "bundle_sha256": manifest_sha256(root),
        "hashes_verified": True,
        "architecture": manifest.architecture,
        "precision": manifest.precision,
        "target": manifest.target,
        "backend": manifest.backend,
        "tile_size": manifest.tile_size,
        "num_crops": manifest.preprocessing.num_crops,
        "vision_input": manifest.export.vision_input,  # format 1.3: layout and shape of vision.onnx's input
        "positions": manifest.export.positions,  # format 1.3: how the decoder positions tokens
        "deepstack": manifest.export.deepstack,  # format 1.4: Qwen3-VL's DeepStack levels
        "hidden_size": manifest.hidden_size,
        "tokens_per_image": manifest.tokens_per_image,
        "embedding_dim": manifest.embedding_dim,
        "max_seq_len": manifest.max_seq_len,
        # rows of several images: the separator the chat template puts between image parts (None: one per row)
        "image_separator": manifest.prompts.image_separator,
        "graphs": graphs,
        "prompts": {
            "image": manifest.prompts.image,
            "text": manifest.prompts.text,
            "composed": manifest.prompts.composed,
        },
        "pooling": manifest.pooling,
        "source_checkpoint": vars(manifest.source_checkpoint),
        "lineage": vars(manifest.lineage),
        "fidelity": {"passed": gate.get("passed"), "checks": gate.get("checks", [])},
        "outliers": report.get("outliers"),
        "int8_treatment": _treatment(report),
        "versions": manifest.versions,
    }


def _balance_nodes(balance: dict[str, Any] | None) -> list[str]:
    """The ops the balance stage kept float, where the check took them."""
    return list(balance["chosen"]) if balance and balance.get("taken") else []


def print_summary(console: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print(
        Text.assemble(
            (str(summary["bundle"]), "bold"),
            f"  sha256 {summary['bundle_sha256'][:16]}…  ",
            ("all file hashes verified", "green"),
        )
    )
    console.print(
        f"architecture {summary['architecture']}  precision {summary['precision']}  target {summary['target']}  "
        f"backend {summary['backend']}"
    )
    vision_input = summary.get("vision_input") or {}
    if vision_input.get("layout") == "patches":
        grid = "×".join(str(v) for v in vision_input.get("grid_thw", []))
        layout = f"{vision_input['shape'][1]} patches (grid {grid})"
    else:
        layout = f"{summary['num_crops']} crop(s)"
    positions = (summary.get("positions") or {}).get("kind", "1d")
    console.print(
        f"tile {summary['tile_size']} px → {layout}, {summary['tokens_per_image']} image tokens ({positions} "
        f"positions); embedding dim {summary['embedding_dim']}; max sequence {summary['max_seq_len']}"
    )
    deepstack = summary.get("deepstack") or {}
    if deepstack:
        console.print(
            f"DeepStack: {deepstack['levels']} levels from vision blocks {deepstack['vision_blocks']}, added after "
            f"decoder layers {deepstack['added_after_decoder_layers']} ({deepstack['input']})"
        )
    if summary.get("hidden_size") and summary["embedding_dim"] < summary["hidden_size"]:
        console.print(f"Matryoshka: the {summary['hidden_size']}-wide embedding cut to {summary['embedding_dim']}")
    separator = summary["image_separator"]
    console.print(
        "images per row: one (re-export with pue-export onnx for several)"
        if separator is None
        else f"images per row: several, placeholders joined by {separator!r}"
    )
    source = summary["source_checkpoint"]
    console.print(
        f"source checkpoint {source['name']} ({source['model_type']}, weights sha256 {source['sha256'][:16]}…)"
    )
    graphs = Table(title="graphs")
    for column in ("graph", "size", "inputs", "outputs"):
        graphs.add_column(column)
    for graph in summary["graphs"].values():
        graphs.add_row(
            f"{graph['file']}" + (" (+ external data)" if graph["external_data"] else ""),
            f"{graph['size_bytes'] / 1e6:.1f} MB",
            "\n".join(graph["inputs"]),
            "\n".join(graph["outputs"]),
        )
    console.print(graphs)
    for kind, text in summary["prompts"].items():
        console.print(f"prompt[{kind}]: {text!r}")
    checks = summary["fidelity"]["checks"]
    if checks:
        table = Table(title="recorded fidelity")
        for column in ("check", "metric", "value", "result"):
            table.add_column(column)
        for check in checks:
            table.add_row(
                check["name"], check["metric"], f"{check['value']:.3g}", "pass" if check["passed"] else "FAIL"
            )
        console.print(table)
    outliers = summary.get("outliers")
    if outliers:
        console.print(
            f"activation outliers of the FP32 parent ({outliers['tensors']} quantizable activations): "
            f"{outliers['channel_outlier_tensors']} with a channel ratio >= {outliers['threshold']:g}, "
            f"{outliers['token_outlier_tensors']} with a token ratio >= {outliers['threshold']:g}"
        )
        for tensor in outliers["worst"][:3]:
            console.print(
                f"  {tensor['graph']} {tensor['readers'][0]}: channels {tensor['channel_ratio']:.0f}x "
                f"(top {tensor['top_channels']}), tokens {tensor['token_ratio']:.0f}x "
                f"(positions {tensor['top_positions']})"
            )
    if treatment := summary.get("int8_treatment"):
        # OpenVINO's per-token ops are int8 weights whose inputs it quantizes at run time (as the quantize summary says)
        at_run_time = summary.get("target") == "openvino"
        print_treatment(console, treatment, " (int8 weights; OpenVINO quantizes the input at run time)" * at_run_time)
    passed = summary["fidelity"]["passed"]
    console.print("fidelity: " + ("PASSED" if passed else "FAILED" if passed is False else "not recorded"))


def print_treatment(console: Any, treatment: dict[str, Any], per_token_how: str = "") -> None:
    """What the INT8 search did to the graphs (`_treatment`): ops float and why, per token (`per_token_how`: how,
    where the bundle's target does it its own way), smoothed, split, ranges."""
    console.print(
        f"int8 treatment: {len(treatment['float_nodes'])} ops kept float, {len(treatment['per_token_nodes'])} "
        f"per token, {len(treatment['smoothed'])} groups smoothed, residual stream "
        + ("rotated" if treatment["rotated"] else "not rotated")
    )
    for node in treatment["per_token_nodes"]:
        console.print(f"  per token: {node}{per_token_how}")
    target_float = set(treatment.get("target_float_nodes") or [])
    balance = treatment.get("kind_balance") or {}
    balanced = set(treatment.get("balance_float_nodes") or [])
    for node in treatment["float_nodes"]:
        why = " (the target backend computes it differently from onnxruntime)" if node in target_float else ""
        why = f" ({balance.get('kind')} needed it: kind balance)" if node in balanced else why
        console.print(f"  float: {node}{why}")
    if balance:
        ratio = balance["error"] / max(balance["rest_error"], 1e-12)
        console.print(
            f"  kind balance: {balance['kind']} carried {ratio:.1f}x "
            f"the other rows' error; {len(balance['chosen'])} ops chosen "
            f"({balance['chosen_flop_share']:.1%} of the weight FLOPs), "
            + ("taken" if balance["taken"] else "not taken")
        )
    for group in treatment["smoothed"]:
        console.print(f"  smoothed (alpha {group['alpha']}, {group['fold']}): {', '.join(group['nodes'])}")
    for graph, done in (treatment.get("channel_split") or {}).items():
        console.print(
            f"  {graph}: residual channels {done['channels']} written in float by {len(done['writers'])} writers"
            + (f", read in float by {len(done['readers'])} readers" if done.get("readers") else "")
        )
    for graph, outputs in (treatment.get("output_bias") or {}).items():
        for output, shift in outputs.items():
            console.print(
                f"  {graph}: {output} bias-corrected (shift {shift['relative']:.2%} of its rms, largest channel "
                f"{shift['max_abs']:.3g})"
            )
    for graph, ops in (treatment.get("row_split_hoist") or {}).items():
        for op in ops:
            console.print(f"  {graph}: {op} reads its rows already split (OpenVINO's int8 form)")
    ranges = treatment.get("ranges") or {}
    if ranges:
        console.print(f"  activation ranges: {ranges['rule']}, {len(ranges['clipped'])} tensors clipped")
        for tensor, clip in ranges["clipped"].items():
            console.print(f"  clipped to {clip:g} of MinMax: {tensor}")
