"""Qwen2-VL and Qwen2.5-VL (issue 17): M-RoPE ids against `get_rope_index`, parity of the tiny checkpoints with
the GME recipe (images, texts, composed, image sets, a mixed padded batch), and the gate catching 1-D positions.

One tiny checkpoint and one bundle per architecture, exported once per module with a small held-out set."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qwen_helpers import mixed_batch_cosines, small_heldout  # noqa: E402

from pue.bundle import file_entry, read_manifest, write_manifest  # noqa: E402
from pue.export.architectures.qwen2_vl import mrope_position_ids  # noqa: E402

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl")
RECIPE = "gme"


@pytest.fixture(scope="module")
def qwen_bundle(tmp_path_factory, tiny_checkpoint):
    cache: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch not in cache:
            from pue.export.onnx_bundle import export_onnx_bundle

            out = tmp_path_factory.mktemp("qwen") / arch
            export_onnx_bundle(tiny_checkpoint(arch, "ci"), out, recipe=RECIPE, heldout=small_heldout())
            cache[arch] = out
        return cache[arch]

    return build


@pytest.fixture(scope="module")
def qwen_reference(tiny_checkpoint):
    cache: dict[str, object] = {}

    def load(arch: str):
        if arch not in cache:
            from pue.export import ReferenceEmbedder

            cache[arch] = ReferenceEmbedder.load(tiny_checkpoint(arch, "ci"), recipe=RECIPE)
        return cache[arch]

    return load


# --- M-RoPE ids -------------------------------------------------------------------------------------------------


def _rows(tokens: int, image_id: int, start_id: int, end_id: int) -> list[list[int]]:
    """A text row, an image row, a composed row, a two-image row and a short text (ids as the processor makes)."""
    image = [start_id, *[image_id] * tokens, end_id]
    return [
        [5, 6, 7, 8, 9, 10, 11],
        [5, 6, *image, 7, 8],
        [5, *image, 9, 10, 11, 12, 13],
        [5, *image, *image, 6],
        [5, 6],
    ]


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "qwen3_vl"])  # Qwen3-VL: the same ids, interleaved by its rotary
@pytest.mark.parametrize("side", ["right", "left"])
def test_mrope_ids_are_get_rope_index_for_every_row_of_a_mixed_padded_batch(arch, side):
    import onnxruntime as ort

    from pue.export.tiny_qwen import build_qwen

    model, processor, info = build_qwen(arch, seed=0)
    config = model.config
    merge = config.vision_config.spatial_merge_size
    grid = (1, 16, 16)  # a 224 px tile: 16 x 16 patches, 8 x 8 tokens
    tokens = grid[1] * grid[2] // merge**2
    rows = _rows(tokens, config.image_token_id, config.vision_start_token_id, config.vision_end_token_id)
    length = max(map(len, rows))
    ids = torch.zeros((len(rows), length), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        at = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[b, at], mask[b, at] = torch.tensor(row), 1
    is_image = ids == config.image_token_id
    images = int(is_image.sum()) // tokens
    expected, _ = model.model.get_rope_index(
        ids, is_image.to(torch.int64), torch.tensor([list(grid)] * images), attention_mask=mask
    )
    ours = mrope_position_ids(mask, is_image, tokens, grid[2] // merge, max(grid[1:]) // merge)
    real = mask.bool()[None].expand(3, -1, -1)
    assert torch.equal(ours[real], expected[real])
    assert int(ours[1:, 1].max()) > int(ours[0, 1].max()) - 1  # image rows really use the 2-D grid

    class Positions(torch.nn.Module):
        def forward(self, attention_mask, image):
            return mrope_position_ids(attention_mask, image, tokens, grid[2] // merge, max(grid[1:]) // merge)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "positions.onnx"
        torch.onnx.export(
            Positions(),
            (mask, is_image),
            str(path),
            input_names=["mask", "image"],
            dynamo=False,
            dynamic_axes={"mask": {0: "b", 1: "s"}, "image": {0: "b", 1: "s"}},
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (graph_ids,) = session.run(None, {"mask": mask.numpy(), "image": is_image.numpy()})
    assert np.array_equal(graph_ids[real.numpy()], expected[real].numpy())


# --- parity -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_export_passes_the_parity_gate_and_records_the_contract(arch, qwen_bundle):
    manifest = read_manifest(qwen_bundle(arch))
    checks = manifest.fidelity["parity_gate"]["checks"]
    cosines = {c["name"]: c["value"] for c in checks if c["metric"] == "min cosine"}
    assert set(cosines) == {"images", "texts", "composed", "image_sets"}
    assert min(cosines.values()) >= 0.9999
    assert manifest.format_version == "1.4" and manifest.preprocessing.kind == "patches"
    assert manifest.export.vision_input == {"layout": "patches", "shape": ["batch", 256, 1176], "grid_thw": [1, 16, 16]}
    assert manifest.export.positions["kind"] == "mrope" and manifest.export.positions["image_grid"] == [1, 8, 8]
    assert manifest.tokens_per_image == 64 and manifest.recipe["name"] == RECIPE
    assert manifest.prompts.image_separator == "<|vision_end|><|vision_start|>"
    assert [t.name for t in manifest.graphs["decoder"].inputs] == ["input_ids", "attention_mask", "image_features"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_mixed_padded_batch_matches_the_reference_per_sample(arch, qwen_bundle, qwen_reference):
    cosines = mixed_batch_cosines(qwen_bundle(arch), qwen_reference(arch))
    assert cosines.min() >= 0.9999, cosines


# --- the gate catches wrong positions ---------------------------------------------------------------------------


def test_the_gate_catches_one_dimensional_positions(tmp_path, qwen_bundle, qwen_reference):
    """A decoder exported with LLaVA's 1-D positions: text rows are unchanged (their ids are the same), image and
    composed rows fall below 0.999."""
    from pue.export.architectures.decoder import EmbeddingDecoder
    from pue.export.onnx_graphs import GraphExport, export_graph
    from pue.export.parity import TOLERANCES, reference_outputs, run_parity_gate
    from pue.gate_set import GateSet
    from pue.runtime import Embedder

    reference = qwen_reference("qwen2_vl")
    broken = tmp_path / "broken"
    shutil.copytree(qwen_bundle("qwen2_vl"), broken)
    manifest = read_manifest(broken)
    base = reference.model.model
    decoder = EmbeddingDecoder(base.language_model, base.get_input_embeddings(), manifest.image_token_id, None).eval()
    tokens, hidden = manifest.tokens_per_image, manifest.hidden_size
    ids = torch.full((2, tokens + 8), manifest.tokenizer.pad_token_id)
    ids[0, 2 : 2 + tokens] = manifest.image_token_id
    spec = GraphExport(
        "decoder",
        decoder,
        (ids, torch.ones_like(ids), torch.zeros((2, tokens, hidden))),
        ["input_ids", "attention_mask", "image_features"],
        ["sentence_embedding"],
        {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "image_features": {0: "batch", 1: "image_tokens"},
            "sentence_embedding": {0: "batch"},
        },
    )
    (broken / "decoder.onnx").unlink()
    export_graph(spec, broken)
    manifest.graphs["decoder"].file = file_entry(broken, "decoder.onnx")
    write_manifest(broken, manifest)

    gate_set = GateSet.default(small_heldout(), minimum=2)
    expected = reference_outputs(reference, gate_set)
    with Embedder.load(broken) as embedder:
        report = run_parity_gate(embedder, expected, gate_set, TOLERANCES["float32"])
    cosines = {c.name: c.value for c in report.checks if c.metric == "min cosine"}
    assert not report.passed
    assert cosines["images"] < 0.999 and cosines["composed"] < 0.999, cosines
    assert cosines["texts"] >= 0.9999, json.dumps(cosines)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_graphs_pass_the_onnx_checker_with_standard_ops_only(arch, qwen_bundle):
    """What `pue-export trt` needs from a root bundle (its engines stay unverified until a GPU run)."""
    import onnx

    for name in ("vision", "decoder"):
        model = onnx.load(str(qwen_bundle(arch) / f"{name}.onnx"))
        onnx.checker.check_model(model)
        domains = {node.domain for node in model.graph.node}
        assert domains <= {"", "ai.onnx"}, (name, domains)


def test_openvino_runs_the_windowed_bundle_like_onnxruntime(qwen_bundle):
    """A second backend reads the patches layout and the in-graph M-RoPE unchanged."""
    pytest.importorskip("openvino")
    from pue.runtime import Embedder, Query

    images = small_heldout()
    queries = [
        Query(text="stroma"),
        Query(image=images[0]),
        Query(image=images[1], text="as IHC"),
        Query(images=images[2:4]),
    ]
    bundle = qwen_bundle("qwen2_5_vl")
    with Embedder.load(bundle, backend="onnxruntime") as ort, Embedder.load(bundle, backend="openvino") as ov:
        cosines = np.sum(ort.embed(queries) * ov.embed(queries), axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_inspect_shows_the_patch_layout_and_mrope(qwen_bundle):
    from rich.console import Console

    from pue.export.inspect_bundle import describe_bundle, print_summary

    console = Console(record=True, width=200)
    print_summary(console, describe_bundle(qwen_bundle("qwen2_vl")))
    assert "tile 224 px → 256 patches (grid 1×16×16), 64 image tokens (mrope positions)" in console.export_text()
