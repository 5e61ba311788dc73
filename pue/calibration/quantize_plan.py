"""The resource plan of one `pue-export quantize` run: what its graphs, calibration rows and gate set will need
(peak host memory, passes), from the parent bundle before any work; `resources.py` holds the arithmetic."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from pue.bundle import Manifest
from pue.calibration.resources import GraphLoad, QuantizePlan, activation_bytes, attention_bytes, plan_quantize
from pue.calibration.search_variants import widens_weights
from pue.errors import BundleError
from pue.gate_set import GateSet
from pue.precisions import ActivationScheme

OUTLIER_SAMPLES = 8  # calibration rows per graph for the outlier report (fidelity.json, inspect)


def vision_tokens(manifest: Manifest) -> int:
    """Vision tokens of one image (every crop), from the manifest's preprocessing and patch size."""
    config = manifest.preprocessing
    patch = manifest.export.patch_size
    if not patch:
        raise BundleError(
            "the bundle's manifest does not record the vision patch size (export.patch_size)",
            "re-export the FP32 bundle with this version of pue-export",
        )
    return int(config.num_crops * (config.crop_size // patch) ** 2)


def most_images_per_row(parent: Any, gate_set: GateSet, plan: Any) -> tuple[int, int]:
    """The most images one decoder row of this run holds (image sets of the gate and of calibration, if any), and how
    many gate rows hold that many (they share a batch: the runtime batches rows of one length together)."""
    if not getattr(parent, "takes_image_sets", False):
        return 1, 0
    fitting = [len(s) for s in gate_set.image_sets if len(s) <= parent.max_images_per_row]
    calibration = [len(s) for s in plan.image_sets if len(s) <= parent.max_images_per_row]  # the rest are not run
    most = max([1, *fitting, *calibration])
    return most, max(1, fitting.count(most))


def run_plan(
    manifest: Manifest,
    models: dict[str, Any],
    feeds: dict[str, Callable[..., Any]],
    tokens: dict[str, int],
    longest_rows: tuple[int, int],
    gate_set: GateSet,
    options: Any,
) -> QuantizePlan:
    """Peak memory and passes of this run, from the graphs (weights, quantized inputs, attention over the longest
    row: the image prompt with `longest_rows[0]` images, `longest_rows[1]` of them in a gate batch) and the options
    (its QuantizeOptions)."""
    from pue.calibration.graph_ops import weight_ops

    static = options.spec.calibrated
    export = manifest.export
    crop_tokens = (export.crop_size // export.patch_size) ** 2 + 1 if export.crop_size and export.patch_size else 0
    images_per_row, set_rows = longest_rows
    longest = tokens["decoder"] + (images_per_row - 1) * manifest.tokens_per_image
    sequences = {"vision": (export.num_crops or 1, crop_tokens), "decoder": (1, longest)}
    graphs, op_count, all_ops = {}, 0, []
    for name, model in models.items():
        spec = manifest.graphs[name]
        ops = [op for op in weight_ops(model, name) if static or op.op_type == "MatMul"]
        op_count += len(ops)
        all_ops += ops
        layers = sum(node.op_type == "Softmax" for node in model.graph.node)
        heads = int((export.attention.get(name) or {}).get("heads", 0))
        count, length = sequences[name]
        graphs[name] = GraphLoad(
            weights_bytes=spec.file.size + sum(entry.size for entry in spec.external_data),
            activation_bytes_per_row=activation_bytes(ops, sequences[name][0] * sequences[name][1]),
            attention_bytes_per_row=attention_bytes(heads, length, layers, count),
            attention_layers=layers,
            rows_per_pass=len(feeds[name]()),
        )
    return plan_quantize(
        options.precision,
        graphs,
        calibrated=static,
        fallback=options.fallback,
        op_count=op_count,
        outlier_rows=OUTLIER_SAMPLES,
        gate_items=gate_set.item_count(),
        batch_attention_bytes=batch_attention(graphs, manifest, tokens["decoder"], longest, set_rows),
        ranked_ops=min(options.rank_ops, op_count),
        every_row_calibrates=options.method != "minmax",  # minmax: pue's ranges, onnxruntime's calibrator reads a row
        variants=search_variants(options),
        gptq=options.gptq and options.precision != "fp16",
        balance_measures=balance_measures(all_ops, options),
    )


def balance_measures(ops: list[Any], options: Any) -> int:
    """The most simulated candidates the balance stage measures (`kind_balance`): the best as it is, each block, and
    each op of the `OPENED` largest blocks; 0 where it cannot run (no budget, no end-to-end ranking)."""
    from pue.calibration.kind_balance import OPENED, block_of

    if options.balance_budget <= 0 or options.rank_ops <= 0:
        return 0
    sizes = Counter(block_of(op) for op in ops)
    return 1 + len(sizes) + sum(size for _, size in sizes.most_common(OPENED))


def search_variants(options: Any) -> int:
    """How many candidates the INT8 search may try before its fallback, besides GPTQ's
    (`search_variants.initial_variants`): static INT8 the massive-token readers in float, error-chosen ranges and the
    patch Conv in float; int8-dynamic the massive-token ops per token and every op per token (OpenVINO's: neither);
    all the writers' amplified columns in float, then the readers' too, and (where `widens_weights`) 8-bit weights,
    after which the others may be tried again with them (`search_variants.retried_with_8_bit_weights`)."""
    if options.precision == "fp16":
        return 0
    split = 2 * int(options.split_channels)  # amplified columns in float (writers', then readers'): high gains
    if options.spec.calibrated:
        others = int(options.fallback) * 2 + int(options.method == "minmax" and options.error_ranges) + split
    elif options.spec.qdq.scheme == ActivationScheme.GROUPED:  # per token already: no per-token variants
        others = split
    else:
        others = 2 * int(options.per_token) + split
    return others + int(widens_weights(options)) * (1 + others + int(options.gptq))  # GPTQ's variant retried too


def batch_attention(graphs: dict[str, GraphLoad], manifest: Manifest, single: int, longest: int, set_rows: int) -> int:
    """One layer's attention scores for the largest batch the gate embeds: a batch of single-image rows, of vision
    crops, or the image sets of the longest kind together."""
    batch = manifest.default_batch_size
    vision, decoder = graphs["vision"].layer_attention_bytes, graphs["decoder"].layer_attention_bytes
    decoder_single = decoder * single * single // max(1, longest * longest)  # `decoder` was counted at `longest`
    return int(max(batch * vision, batch * decoder_single, set_rows * decoder))
