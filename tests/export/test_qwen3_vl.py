"""Qwen3-VL (issue 17): parity of the tiny checkpoint with each shipped Qwen3-VL recipe (HOMIE with its double
resize, Qwen3-VL-Embedding with a Matryoshka cut), the gate catching a dropped DeepStack and wrong M-RoPE ids,
HOMIE's preprocessing against the HF chain, standard ops, and the 8 B resource plan.

One checkpoint, one bundle per recipe, exported once per module with a small held-out set; the broken decoders
are checked against reference embeddings computed once."""

from __future__ import annotations

import copy
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qwen_helpers import MATRYOSHKA_CUT, export_heldout, mixed_batch_cosines, small_heldout  # noqa: E402

from pue.bundle import file_entry, read_manifest, write_manifest  # noqa: E402

ARCH = "qwen3_vl"
HOMIE_TILE = 256  # HOMIE's factor-28 resize makes it 252 px, the Qwen3 processor 256 again: a real double resize
CUT = MATRYOSHKA_CUT


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_checkpoint, qwen3_embedding_bundle) -> dict[str, Path]:
    """HOMIE's bundle, exported here, and the session's Qwen3-VL-Embedding bundle (Matryoshka cut to CUT)."""
    from pue.export.onnx_bundle import export_onnx_bundle

    homie = tmp_path_factory.mktemp("qwen3") / "homie"
    export_onnx_bundle(
        tiny_checkpoint(ARCH, "ci"), homie, recipe="homie", tile_size=HOMIE_TILE, heldout=export_heldout()
    )
    return {"homie": homie, "embedding": qwen3_embedding_bundle}


@pytest.fixture(scope="module")
def homie_reference(tiny_checkpoint):
    from pue.export import ReferenceEmbedder

    return ReferenceEmbedder.load(tiny_checkpoint(ARCH, "ci"), recipe="homie", tile_size=HOMIE_TILE)


# --- parity -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["homie", "embedding"])
def test_each_recipe_passes_the_parity_gate_and_records_the_contract(recipe, bundles):
    manifest = read_manifest(bundles[recipe])
    checks = manifest.fidelity["parity_gate"]["checks"]
    cosines = {c["name"]: c["value"] for c in checks if c["metric"] == "min cosine"}
    assert set(cosines) == {"images", "texts", "composed", "image_sets"}
    assert min(cosines.values()) >= 0.9999, cosines
    vision = {c["name"]: c["value"] for c in checks if c["name"].startswith("vision")}
    assert set(vision) == {"vision features", "vision deepstack_features"} and max(vision.values()) <= 1e-5
    assert manifest.format_version == "1.4"
    assert [t.name for t in manifest.graphs["vision"].outputs] == ["image_features", "deepstack_features"]
    assert manifest.graphs["vision"].outputs[1].shape == ["batch", 64, 3, 64]
    decoder = manifest.graphs["decoder"].inputs
    assert [t.name for t in decoder] == ["input_ids", "attention_mask", "image_features", "deepstack_features"]
    assert decoder[3].shape == ["batch", "image_tokens", 3, 64]
    assert manifest.export.deepstack == {
        "input": "deepstack_features",
        "levels": 3,
        "vision_blocks": [1, 2, 3],
        "added_after_decoder_layers": [0, 1, 2],
    }
    positions = manifest.export.positions
    assert positions["kind"] == "mrope" and positions["mrope_interleaved"] and positions["image_grid"] == [1, 8, 8]
    # the released processor's minimum of 65,536 pixels: 224 px and HOMIE's 252 px both become 256 px, 64 tokens
    assert manifest.export.vision_input["shape"] == ["batch", 256, 1536] and manifest.tokens_per_image == 64
    assert manifest.prompts.image_separator == "<|vision_end|><|vision_start|>"


def test_homie_records_its_double_resize_and_pools_before_emb(bundles):
    manifest = read_manifest(bundles["homie"])
    config = manifest.preprocessing.processor_config
    assert config["pre_resize"] == {
        "factor": 28,
        "min_pixels": 4 * 28 * 28,
        "max_pixels": 625 * 28 * 28,
        "resized": [252, 252],
        "resample": 3,
    }
    assert config["resized"] == [256, 256] and manifest.tile_size == HOMIE_TILE
    assert manifest.pooling == {"before_token": "<emb>"}
    assert manifest.prompts.image.endswith(
        "<|vision_end|>\nSummarize above image in one word: <|im_end|>\n<|im_start|>assistant\n<emb>."
    )
    assert "{text}\nSummarize above image and sentence in one word: " in manifest.prompts.composed
    assert manifest.embedding_dim == manifest.hidden_size == 64


def test_the_embedding_recipe_cuts_to_its_matryoshka_dimension(bundles):
    from pue.runtime import Embedder

    manifest = read_manifest(bundles["embedding"])
    assert manifest.embedding_dim == CUT and manifest.hidden_size == 64
    assert manifest.recipe["system"] == "Represent the user's input." and manifest.pooling == "last_token"
    assert manifest.prompts.text.startswith("<|im_start|>system\nRepresent the user's input.<|im_end|>\n")
    with Embedder.load(bundles["embedding"]) as embedder:
        vectors = embedder.embed_texts(["tumor", "benign stroma"])
    assert vectors.shape == (2, CUT)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_a_mixed_padded_batch_matches_the_reference_per_sample(bundles, homie_reference):
    cosines = mixed_batch_cosines(bundles["homie"], homie_reference)
    assert cosines.min() >= 0.9999, cosines


# --- the gate catches a dropped DeepStack and wrong positions ---------------------------------------------------


def chunked_sections(rotary: torch.nn.Module) -> torch.nn.Module:
    """Qwen3-VL's rotary module with Qwen2-VL's contiguous M-RoPE sections instead of interleaved ones."""
    broken = copy.copy(rotary)

    def recompose(self, freq):
        parts = freq.split(list(self.mrope_section), dim=-1)
        joined = torch.cat([part[index % 3] for index, part in enumerate(parts)], dim=-1)
        return torch.cat((joined, joined), dim=-1)

    broken.recomposition_frequencies = types.MethodType(recompose, broken)
    return broken


def broken_decoder(reference, mistake: str):
    """The bundle's decoder with one mistake, and its graph inputs."""
    from pue.export.architectures.decoder import EmbeddingDecoder
    from pue.export.architectures.qwen2_vl import MropeEmbeddingDecoder
    from pue.export.architectures.qwen3_vl import DeepstackEmbeddingDecoder

    base = reference.model.model
    grid = reference.geometry.grid_thw
    kwargs = dict(
        language_model=base.language_model,
        embed_tokens=base.get_input_embeddings(),
        image_token_id=int(reference.model.config.image_token_id),
        pool_token_id=reference.pool_token_id,
        tokens_per_image=reference.geometry.tokens_per_image,
        grid_h=grid[1] // 2,
        grid_w=grid[2] // 2,
    )
    if mistake == "dropped deepstack":  # what exporters without the DeepStack path compute
        return MropeEmbeddingDecoder(**kwargs).eval(), 3
    decoder = DeepstackEmbeddingDecoder(**kwargs).eval()
    if mistake == "1-d positions":
        decoder.positions = types.MethodType(EmbeddingDecoder.positions, decoder)
    else:  # "contiguous sections": a view of the language model (nothing of the reference's is changed)
        view = copy.copy(decoder.language_model)
        view._modules = dict(view._modules)
        view._modules["rotary_emb"] = chunked_sections(view.rotary_emb)
        decoder.language_model = view
    return decoder, 4


def with_decoder(bundle: Path, folder: Path, module, inputs: int) -> Path:
    from pue.export.onnx_graphs import GraphExport, export_graph

    broken = folder / "broken"
    shutil.copytree(bundle, broken)
    manifest = read_manifest(broken)
    tokens, hidden = manifest.tokens_per_image, manifest.hidden_size
    ids = torch.full((2, tokens + 8), manifest.tokenizer.pad_token_id)
    ids[0, 2 : 2 + tokens] = manifest.image_token_id
    names = ["input_ids", "attention_mask", "image_features", "deepstack_features"][:inputs]
    args = (ids, torch.ones_like(ids), torch.zeros((2, tokens, hidden)), torch.zeros((2, tokens, 3, hidden)))[:inputs]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    axes |= {name: {0: "batch", 1: "image_tokens"} for name in names[2:]} | {"sentence_embedding": {0: "batch"}}
    (broken / "decoder.onnx").unlink()
    export_graph(GraphExport("decoder", module, args, names, ["sentence_embedding"], axes), broken)
    manifest.graphs["decoder"].file = file_entry(broken, "decoder.onnx")
    manifest.graphs["decoder"].inputs = [spec for spec in manifest.graphs["decoder"].inputs if spec.name in names]
    write_manifest(broken, manifest)
    return broken


@pytest.fixture(scope="module")
def gate_expected(homie_reference):
    from pue.export.parity import reference_outputs
    from pue.gate_set import GateSet

    images = small_heldout()
    gate_set = GateSet(images[:2], ["tumor", "benign stroma"], images[2:4], ["as IHC", "at 40x"], [images[:2]])
    return gate_set, reference_outputs(homie_reference, gate_set)


@pytest.mark.parametrize("mistake", ["dropped deepstack", "1-d positions", "contiguous sections"])
def test_the_gate_catches(mistake, tmp_path, bundles, homie_reference, gate_expected):
    """Text rows have no image tokens, so none of these mistakes moves them; image and composed rows fall below
    0.999."""
    from pue.export.parity import TOLERANCES, run_parity_gate
    from pue.runtime import Embedder

    gate_set, expected = gate_expected
    module, inputs = broken_decoder(homie_reference, mistake)
    with Embedder.load(with_decoder(bundles["homie"], tmp_path, module, inputs)) as embedder:
        report = run_parity_gate(embedder, expected, gate_set, TOLERANCES["float32"])
    cosines = {c.name: c.value for c in report.checks if c.metric == "min cosine"}
    assert not report.passed
    assert cosines["images"] < 0.999 and cosines["composed"] < 0.999, cosines
    assert cosines["texts"] >= 0.9999, cosines


# --- preprocessing and graphs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_size", [224, 256, 512])
def test_homie_double_resize_in_numpy_equals_the_hf_chain(tile_size, tiny_checkpoint):
    """HOMIE's factor-28 resize (`qwen_vl_utils.fetch_image`), then `Qwen2VLImageProcessorPil`, against the runtime's
    numpy + Pillow preprocessing of the bundle's recorded settings."""
    from PIL import Image

    from pue.export.qwen_processor import load_qwen_processor
    from pue.export.recipe import load_recipe
    from pue.runtime.preprocess import ImagePreprocessor
    from pue.runtime.preprocess_patches import preprocessing_for_patches

    processor = load_qwen_processor(tiny_checkpoint(ARCH, "ci"))
    processor.pre_resize = load_recipe("homie").image_resize
    spec = preprocessing_for_patches(processor.image_processor.to_dict(), tile_size, processor.pre_resize)
    rng = np.random.default_rng(tile_size)
    tiles = [Image.fromarray(rng.integers(0, 256, (tile_size, tile_size, 3), dtype=np.uint8)) for _ in range(2)]
    tiles.append(Image.open(small_heldout()[0]).convert("RGB").resize((tile_size, tile_size)))
    hf = processor.image_processor(images=[processor.prepare(t) for t in tiles], return_tensors="np")
    ours = ImagePreprocessor(spec)(tiles)
    patches = spec.processor_config["patches"]
    assert ours.shape == (3, patches, spec.processor_config["patch_dim"])
    assert np.abs(ours.reshape(-1, ours.shape[-1]) - hf["pixel_values"]).max() <= 1e-5
    expected_first = {224: [224, 224], 256: [252, 252], 512: [504, 504]}[tile_size]
    assert spec.processor_config["pre_resize"]["resized"] == expected_first


def test_the_graphs_pass_the_onnx_checker_with_standard_ops_only(bundles):
    """What `pue-export trt` needs from a root bundle (its engines stay unverified until a GPU run)."""
    import onnx

    for name in ("vision", "decoder"):
        model = onnx.load(str(bundles["homie"] / f"{name}.onnx"))
        onnx.checker.check_model(model)
        domains = {node.domain for node in model.graph.node}
        assert domains <= {"", "ai.onnx"}, (name, domains)


def test_inspect_shows_deepstack_and_the_matryoshka_cut(bundles):
    from rich.console import Console

    from pue.export.inspect_bundle import describe_bundle, print_summary

    console = Console(record=True, width=200)
    print_summary(console, describe_bundle(bundles["embedding"]))
    text = console.export_text()
    assert "DeepStack: 3 levels from vision blocks [1, 2, 3], added after decoder layers [0, 1, 2]" in text
    assert "Matryoshka: the 64-wide embedding cut to 32" in text


# --- quantization -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantize_heldout(tmp_path_factory) -> Path:
    """The small held-out set as a folder (the fidelity gate's minimum of 4 tiles)."""
    folder = tmp_path_factory.mktemp("heldout")
    for path in small_heldout():
        shutil.copy(path, folder / path.name)
    return folder


def test_an_int8_dynamic_bundle_passes_the_fidelity_gate(bundles, quantize_heldout, tmp_path):
    """`pue-export quantize` on the DeepStack graphs: calibration feeds and the gate carry deepstack_features.
    (FP16 passes too, cosine 1.0 on CPU; left out of CI for its 30-40 s.)"""
    from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle
    from pue.runtime import Embedder

    precision = "int8-dynamic"
    out = tmp_path / precision
    options = QuantizeOptions(precision=precision, heldout=quantize_heldout, num_patches=8, num_captions=4)
    result = quantize_bundle(bundles["homie"], out, options)
    assert result.fidelity.passed, [(c.name, c.metric, c.value) for c in result.fidelity.checks]
    manifest = read_manifest(out)
    assert manifest.precision == precision
    assert [t.name for t in manifest.graphs["decoder"].inputs][-1] == "deepstack_features"
    with Embedder.load(out) as embedder:
        assert embedder.embed_images(export_heldout()[:1]).shape == (1, 64)


def test_a_static_int8_bundle_passes_the_fidelity_gate(qwen3_embedding_bundle, quantize_heldout, tmp_path):
    """Static INT8, TensorRT's Q/DQ flavour, on the Matryoshka bundle: calibration feeds carry the patch layout and
    deepstack_features, every weight MatMul stays int8, the cut survives. The other modes and arches: README's table
    (scripts/fidelity_matrix.py)."""
    import onnx

    from pue.calibration.quantize_bundle import QuantizeOptions, quantize_bundle
    from pue.runtime import Embedder

    out = tmp_path / "int8"
    options = QuantizeOptions(
        precision="int8", target="tensorrt", heldout=quantize_heldout, num_patches=8, num_captions=4
    )
    result = quantize_bundle(qwen3_embedding_bundle, out, options)
    assert result.fidelity.passed, [(c.name, c.metric, c.value) for c in result.fidelity.checks]
    assert result.int8_flop_share >= 0.8
    for graph in ("vision", "decoder"):
        ops = {node.op_type for node in onnx.load(str(out / f"{graph}.onnx"), load_external_data=False).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not {"MultiHeadAttention", "GroupQueryAttention"} & ops
    manifest = read_manifest(out)
    assert (
        manifest.embedding_dim == CUT
        and [t.name for t in manifest.graphs["decoder"].inputs][-1] == "deepstack_features"
    )
    with Embedder.load(out) as embedder:
        assert embedder.embed_composed(export_heldout()[:1], ["as IHC"]).shape == (1, CUT)


def test_rotate_on_is_refused_with_what_to_do(bundles):
    """The per-head q/k norms are not the residual stream's (no width error); the DeepStack additions are not folded
    by the rotation yet, so `--rotate on` says so and names --rotate off, before anything is written."""
    import onnx

    from pue.calibration.readers import DecoderFeeds, default_captions, make_plan
    from pue.calibration.rotation import RotationError, rotate_for_int8
    from pue.calibration.sampling import sample_patches
    from pue.calibration.sources import open_sources
    from pue.runtime import Embedder

    path = bundles["homie"] / "decoder.onnx"
    with Embedder.load(bundles["homie"]) as embedder:
        patches, _ = sample_patches(open_sources(None, patch_size=embedder.manifest.tile_size), 2)
        plan = make_plan(patches, default_captions(2))
        with pytest.raises(RotationError, match=r"--rotate on: this decoder.s residual stream cannot be.*Split"):
            rotate_for_int8({"decoder": onnx.load(str(path))}, path, lambda n: DecoderFeeds(embedder, plan, n), "on")


# --- the 8 B resource plan --------------------------------------------------------------------------------------


def qwen3_vl_8b_config():
    """Qwen3-VL-8B-Instruct's published config values (text: Qwen3-8B-sized; vision: SigLIP-2-so400m-sized, 27 blocks
    with DeepStack from 8, 16 and 24)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "out_hidden_size": 4096,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def test_the_8b_plan_counts_the_parameters_of_the_model_on_the_meta_device():
    from pue.export.architectures import get_architecture
    from pue.export.resources import plan_export

    config = qwen3_vl_8b_config()
    model_class = get_architecture("qwen3_vl").model_class()
    plan = plan_export(config, model_class, dtype="float16", device="cuda", available=128 * 1024**3)
    with torch.device("meta"):
        model = model_class(config)
    counted = sum(p.numel() for p in model.parameters())
    assert abs(plan.parameters - counted) <= 0.01 * counted
    assert 8.5e9 < counted < 9.0e9  # Qwen3-VL-8B: 8.77 B with its untied LM head
    head = 151936 * 4096
    assert abs(plan.exported_parameters - (counted - head)) <= 0.01 * counted
    assert plan.checkpoint_bytes["float16"] == 2 * plan.parameters and plan.fits
