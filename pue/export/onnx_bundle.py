"""`pue-export onnx`: checkpoint → FP32 (or FP16) bundle of two ONNX graphs, verified against the reference.

Order matters for 8 B checkpoints: the reference's outputs are computed first, the graphs exported, torch's
model freed, and only then does onnxruntime load the graphs for the parity gate.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pue import __version__
from pue.bundle import (
    ExportInfo,
    GraphSpec,
    Lineage,
    Manifest,
    Prompts,
    SourceCheckpoint,
    TensorSpec,
    TokenizerInfo,
    atomic_directory,
    check_output_path,
    file_entry,
    write_manifest,
)
from pue.choices import BundleTarget, ExportDtype, Precision, parse_choice
from pue.errors import PueError
from pue.export.architectures import get_architecture
from pue.export.checkpoint import checkpoint_sha256, inspect_checkpoint, load_model, load_processor
from pue.export.onnx_graphs import DEFAULT_EXPORTER, DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, GraphExport, export_graph
from pue.export.parity import TOLERANCES, reference_outputs, run_parity_gate
from pue.export.recipe import Recipe, image_placeholder, load_recipe, render_prompts
from pue.export.reference import ReferenceEmbedder
from pue.export.resources import ResourcePlan, plan_export
from pue.fidelity import GateReport, fail_gate
from pue.gate_set import GateSet

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


@dataclass
class ExportResult:
    bundle: Path
    plan: ResourcePlan
    gate: GateReport
    timings: dict[str, float]
    manifest: Manifest


def export_onnx_bundle(
    checkpoint: str | Path,
    output: str | Path,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    tile_size: int = 224,
    recipe: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    heldout: str | Path | list[Path] | None = None,
    progress: Callable[[str], None] | None = None,
    processor: str | Path | None = None,
    embedding_dim: int | None = None,
) -> ExportResult:
    """`embedding_dim`: a Matryoshka output dimension below the model's width, where the recipe allows it (the
    manifest records it; the runtime cuts and renormalises)."""
    say = progress or (lambda message: log.info(message))
    dtype = str(parse_choice(ExportDtype, dtype, "--dtype"))
    if dtype not in TOLERANCES:
        raise PueError(f"unknown dtype '{dtype}'", "choose float32 or float16")
    if tile_size < 32:
        raise PueError(f"tile size {tile_size} is too small", "use the patch size of your pipeline, e.g. 224 or 512")
    check_output_path(output, overwrite)
    info = inspect_checkpoint(checkpoint)
    resolved_recipe = load_recipe(recipe)
    architecture = get_architecture(info.model_type)
    timings: dict[str, float] = {}

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(info.path, local_files_only=True)
    plan = plan_export(config, architecture.model_class(), dtype=dtype, device=device)
    for line in plan.lines():
        say(f"plan: {line}")
    if not plan.fits:
        raise PueError("the resource plan does not fit this machine", "; ".join(plan.notes))

    started = time.perf_counter()
    say("loading the checkpoint")
    loaded_processor = load_processor(info, processor)
    model = load_model(info, dtype=dtype, device=device)
    reference = ReferenceEmbedder(
        info, model, loaded_processor, resolved_recipe, tile_size, embedding_dim=embedding_dim
    )
    timings["load_s"] = time.perf_counter() - started

    gate_set = GateSet.default(heldout, minimum=2)
    started = time.perf_counter()
    say(f"reference embeddings ({gate_set.counts()})")
    expected = reference_outputs(reference, gate_set)
    timings["reference_s"] = time.perf_counter() - started

    with atomic_directory(output, overwrite=overwrite) as staging:
        started = time.perf_counter()
        say(f"exporting vision.onnx and decoder.onnx ({exporter})")
        manifest = _export_graphs(
            reference, resolved_recipe, staging, exporter, opset, dtype, external_data_threshold, info
        )
        timings["export_s"] = time.perf_counter() - started
        write_manifest(staging, manifest)

        # free torch before onnxruntime loads the graphs: an 8 B model cannot be held twice
        reference.close()
        del model, reference
        gc.collect()

        from pue.runtime import Embedder

        started = time.perf_counter()
        say("parity gate: running the bundle through the runtime")
        embedder = Embedder.load(staging, device="cpu" if device == "cpu" else device)
        gate = run_parity_gate(embedder, expected, gate_set, TOLERANCES[dtype])
        del embedder
        timings["gate_s"] = time.perf_counter() - started
        manifest.fidelity = {"parity_gate": gate.to_dict(), "reference_dtype": dtype, "reference_device": device}
        manifest.export.timings = timings
        write_manifest(staging, manifest)
        if not gate.passed:
            fail_gate(output, "parity gate", gate, {"timings": timings})
    return ExportResult(Path(output), plan, gate, timings, manifest)


def _export_graphs(
    reference: ReferenceEmbedder,
    recipe: Recipe,
    staging: Path,
    exporter: str,
    opset: int | None,
    dtype: str,
    external_data_threshold: int,
    info: Any,
) -> Manifest:
    import torch

    model, processor, architecture = reference.model, reference.processor, reference.architecture
    geometry = reference.geometry
    device = next(model.parameters()).device
    hidden = architecture.hidden_size(model)
    image_token_id = int(model.config.image_token_id)
    tokenizer = processor.tokenizer

    dummy_batch = 2
    pixels = torch.zeros(geometry.pixel_shape(dummy_batch), dtype=torch.float32, device=device)
    tokens = geometry.tokens_per_image
    # per-image tensors both graphs carry: image_features [batch, tokens, hidden], and any the architecture adds
    # ([batch, tokens, levels, hidden], e.g. Qwen3-VL's deepstack_features), placed per row alike
    feature_dims = {"image_features": [hidden]} | {
        name: [levels, hidden] for name, levels in architecture.extra_image_features(model).items()
    }
    vision = GraphExport(
        "vision",
        architecture.vision_module(model, geometry).eval(),
        (pixels,),
        ["pixel_values"],
        list(feature_dims),
        {"pixel_values": {0: "batch"}} | {name: {0: "batch"} for name in feature_dims},
    )
    seq = 8
    ids = torch.full((dummy_batch, tokens + seq), int(tokenizer.pad_token_id or 0), device=device)
    ids[0, 2 : 2 + tokens] = image_token_id
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    features = [
        torch.zeros((dummy_batch, tokens, *dims), dtype=torch.float32, device=device) for dims in feature_dims.values()
    ]
    decoder_module = architecture.decoder_module(model, image_token_id, reference.pool_token_id, geometry).eval()
    decoder = GraphExport(
        "decoder",
        decoder_module,
        (ids, mask, *features),
        ["input_ids", "attention_mask", *feature_dims],
        ["sentence_embedding"],
        {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            **{name: {0: "batch", 1: "image_tokens"} for name in feature_dims},
            "sentence_embedding": {0: "batch"},
        },
    )
    graphs = {}
    for spec, inputs, outputs in (
        (
            vision,
            [TensorSpec("pixel_values", "float32", ["batch", *geometry.pixel_shape(1)[1:]])],
            [TensorSpec(name, "float32", ["batch", tokens, *dims]) for name, dims in feature_dims.items()],
        ),
        (
            decoder,
            [
                TensorSpec("input_ids", "int64", ["batch", "sequence"]),
                TensorSpec("attention_mask", "int64", ["batch", "sequence"]),
                *[TensorSpec(name, "float32", ["batch", "image_tokens", *dims]) for name, dims in feature_dims.items()],
            ],
            [TensorSpec("sentence_embedding", "float32", ["batch", hidden])],
        ),
    ):
        filename, data_files = export_graph(spec, staging, exporter, opset, external_data_threshold)
        graphs[spec.name] = GraphSpec(
            file=file_entry(staging, filename),
            inputs=inputs,
            outputs=outputs,
            external_data=[file_entry(staging, name) for name in data_files],
        )

    tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
    rendered = render_prompts(processor, recipe)
    if reference.image_separator is None:
        log.warning(
            "the chat template of %s does not render several image parts in one user turn: the bundle takes one "
            "image per row",
            info.name,
        )
    preprocessing = architecture.preprocessing(model, processor, geometry.tile_size)
    text_config = model.config.text_config
    max_positions = int(getattr(text_config, "max_position_embeddings", 4096))
    return Manifest(
        architecture=info.model_type,
        precision=Precision.FP16.value if dtype == ExportDtype.FLOAT16 else Precision.FP32.value,
        target=BundleTarget.ANY.value,
        backend="onnxruntime",
        graphs=graphs,
        tile_size=geometry.tile_size,
        preprocessing=preprocessing,
        recipe=recipe.to_dict(),
        prompts=Prompts(
            image_placeholder=image_placeholder(processor), image_separator=reference.image_separator, **rendered
        ),
        pooling=recipe.pooling,
        tokenizer=TokenizerInfo(
            file=file_entry(staging, "tokenizer.json"),
            pad_token_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        ),
        image_token_id=image_token_id,
        tokens_per_image=geometry.tokens_per_image,
        embedding_dim=reference.embedding_dim,
        hidden_size=hidden,
        max_seq_len=max_positions,
        default_batch_size=DEFAULT_BATCH_SIZE,
        source_checkpoint=SourceCheckpoint(name=info.name, sha256=checkpoint_sha256(info), model_type=info.model_type),
        lineage=Lineage(),
        versions=_versions(),
        export=ExportInfo(
            exporter=exporter,
            opset=opset or DEFAULT_OPSET[exporter],
            dtype=dtype,
            num_crops=geometry.num_crops,
            crop_size=geometry.crop_size,
            patch_size=int(model.config.vision_config.patch_size),
            attention=architecture.attention_layout(model),
            decoder_last_layer=getattr(decoder_module, "last_layer_mode", "full sequence"),
            vision_input={"layout": geometry.kind, "shape": ["batch", *geometry.pixel_shape(1)[1:]]}
            | ({"grid_thw": list(geometry.grid_thw)} if geometry.kind == "patches" else {}),
            positions=architecture.positions(model, geometry),
            **architecture.feature_record(model),
        ),
    )


def _versions() -> dict[str, str]:
    from pue.extras import package_versions

    versions = package_versions(("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "tokenizers"))
    return {"pue": __version__, **{name: str(version) for name, version in versions.items()}}
