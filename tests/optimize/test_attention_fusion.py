"""Attention fusion for onnxruntime: found in both exported graphs, numerically the same model after fusion
(mixed, right-padded batches included), and clear refusals when the graph or the manifest does not fit."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pue.bundle import file_entry, read_manifest, write_manifest
from pue.errors import PueError
from pue.optimize.attention import attention_layout, find_attention, fuse_attention
from pue.runtime import Embedder, Query

TEXTS = ["", "glands", "a long caption about " + "tumour stroma and lymphocytes " * 12, "IHC brown"]


def load(bundle, graph):
    return onnx.load(str(bundle / f"{graph}.onnx"))


def fused_copy(bundle, tmp_path):
    """The bundle with both graphs fused, manifest updated (what --attention fused writes, without quantizing)."""
    out = tmp_path / "fused"
    shutil.copytree(bundle, out)
    manifest = read_manifest(out)
    summaries = {}
    for name, spec in manifest.graphs.items():
        model, summary = fuse_attention(load(bundle, name), name, attention_layout(manifest.export, name))
        onnx.save(model, str(out / spec.file.path))
        spec.file = file_entry(out, spec.file.path)
        summaries[name] = summary
    write_manifest(out, manifest)
    return out, summaries


@pytest.mark.parametrize(("arch", "vision_layers"), [("llava_next", 3), ("llava", 3)])
def test_manifest_layout_and_sites(fp32_bundle, arch, vision_layers):
    bundle = fp32_bundle(arch, "ci")
    export = read_manifest(bundle).export
    assert export.attention["vision"] == {"kind": "encoder", "heads": 4, "head_dim": 16}
    assert export.attention["decoder"] == {"kind": "causal", "heads": 4, "kv_heads": 2, "head_dim": 16}
    vision, decoder = find_attention(load(bundle, "vision")), find_attention(load(bundle, "decoder"))
    # vision_feature_layer = -2: the last tower layer is dead code and was never exported
    assert len(vision) == vision_layers and all(site.mask is None for site in vision)
    assert len(decoder) == 5 and all(site.mask is not None for site in decoder)
    assert all(abs(site.scale - 16**-0.5) < 1e-6 for site in vision + decoder)


def test_fused_bundle_embeds_like_the_standard_one(fp32_bundle, gate_images, tmp_path):
    bundle = fp32_bundle("llava_next", "ci")
    fused, summaries = fused_copy(bundle, tmp_path)
    assert summaries["vision"].fused == 3 and summaries["decoder"].fused == 5
    assert summaries["decoder"].op == "GroupQueryAttention + MultiHeadAttention"
    for graph, contrib, softmax_left in (("vision", "MultiHeadAttention", 0), ("decoder", "GroupQueryAttention", 1)):
        ops = [node.op_type for node in load(fused, graph).graph.node]
        # the decoder keeps one: the pooled token's single-row attention in its last layer
        assert contrib in ops and ops.count("Softmax") == softmax_left
    # the [seq, seq] mask path is gone from the decoder, not just bypassed
    assert not any(n.op_type == "Where" and "mask" in n.name.lower() for n in load(fused, "decoder").graph.node)

    standard, fast = Embedder.load(bundle), Embedder.load(fused)
    images = gate_images[:5]
    # one batch mixing texts of very different lengths with image rows: right padding in the decoder
    queries = [Query(text=t) for t in TEXTS] + [Query(image=i) for i in images]
    queries.append(Query(image=images[0], text="more stroma"))
    a, b = standard.embed(queries, batch_size=len(queries)), fast.embed(queries, batch_size=len(queries))
    cosine = (a * b).sum(axis=1)
    assert cosine.min() > 0.99999, cosine
    assert np.abs(a - b).max() < 1e-5
    # the same rows embedded alone agree with the batch (padding did not leak into real tokens)
    alone = np.stack([fast.embed_texts([text])[0] for text in TEXTS])
    assert np.abs(alone - b[: len(TEXTS)]).max() < 1e-5


def _encoder_graph(scale_style: str):
    """A hand-built attention: Q, K, V [B, H, S, D]; the scale as the exporters write it."""
    d = 8
    nodes, inits = [], []
    if scale_style == "split":  # SDPA export: sqrt(scale) on Q and on Kᵀ
        inits += [helper.make_tensor("c", TensorProto.FLOAT, [], [d**-0.25])]
        nodes += [
            helper.make_node("Transpose", ["k"], ["kt0"], perm=[0, 1, 3, 2]),
            helper.make_node("Mul", ["q", "c"], ["qs"]),
            helper.make_node("Mul", ["kt0", "c"], ["kt"]),
            helper.make_node("MatMul", ["qs", "kt"], ["s"]),
        ]
        last = "s"
    else:  # eager: scores / sqrt(d)
        inits += [helper.make_tensor("c", TensorProto.FLOAT, [], [d**0.5])]
        nodes += [
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", "kt"], ["s0"]),
            helper.make_node("Div", ["s0", "c"], ["s"]),
        ]
        last = "s"
    nodes += [
        helper.make_node("Softmax", [last], ["p"], axis=-1),
        helper.make_node("Cast", ["p"], ["pc"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["pc", "v"], ["o"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 2, "S", d]) for n in ("q", "k", "v")]
    output = helper.make_tensor_value_info("o", TensorProto.FLOAT, ["B", 2, "S", d])
    graph = helper.make_graph(nodes, "attn", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("scale_style", ["split", "div"])
def test_scales_are_folded_exactly(scale_style):
    model = _encoder_graph(scale_style)
    sites = find_attention(model)
    assert len(sites) == 1 and abs(sites[0].scale - 8**-0.5) < 1e-7
    fused, summary = fuse_attention(model, "vision", {"kind": "encoder", "heads": 2, "head_dim": 8})
    assert summary.fused == 1
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((3, 2, 7, 8)).astype(np.float32) for n in ("q", "k", "v")}
    assert np.abs(_run(model, feeds) - _run(fused, feeds)).max() < 1e-5
    onnx.checker.check_model(fused)


def _windowed_graph(mask_from_input: bool = False):
    """Two attentions over [B, 2, 8, 8] (Qwen2.5-VL's vision blocks): the first within windows of 4 through a constant
    block-diagonal additive mask [8, 8], the second over every patch."""
    window = np.repeat(np.arange(2), 4)
    mask = np.where(window[:, None] == window[None, :], 0.0, np.finfo(np.float32).min).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["mask"], value=numpy_helper.from_array(mask))]
    if mask_from_input:
        nodes = [helper.make_node("Mul", ["q", "zero"], ["qz"]), helper.make_node("ReduceMean", ["qz"], ["mask"])]
    inits = [
        helper.make_tensor("c", TensorProto.FLOAT, [], [8**0.5]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    hidden = "q"
    for index, masked in enumerate((True, False)):
        p = f"a{index}"
        nodes += [
            helper.make_node("Transpose", ["k"], [f"{p}/kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [hidden, f"{p}/kt"], [f"{p}/s0"]),
            helper.make_node("Div", [f"{p}/s0", "c"], [f"{p}/s1" if masked else f"{p}/s"]),
        ]
        if masked:
            nodes.append(helper.make_node("Add", [f"{p}/s1", "mask"], [f"{p}/s"]))
        nodes += [
            helper.make_node("Softmax", [f"{p}/s"], [f"{p}/p"], axis=-1),
            helper.make_node("MatMul", [f"{p}/p", "v"], [f"{p}/o"]),
        ]
        hidden = f"{p}/o"
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 2, 8, 8]) for n in ("q", "k", "v")]
    output = helper.make_tensor_value_info(hidden, TensorProto.FLOAT, ["B", 2, 8, 8])
    return helper.make_model(
        helper.make_graph(nodes, "windowed", inputs, [output], inits), opset_imports=[helper.make_opsetid("", 17)]
    )


def test_windowed_encoder_takes_its_window_mask_as_attention_bias():
    model = _windowed_graph()
    layout = {"kind": "windowed-encoder", "heads": 2, "head_dim": 8}
    fused, summary = fuse_attention(model, "vision", layout)
    assert summary.fused == 2 and summary.op == "MultiHeadAttention"
    assert [n.op_type for n in fused.graph.node].count("MultiHeadAttention") == 2
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((3, 2, 8, 8)).astype(np.float32) for n in ("q", "k", "v")}
    assert np.abs(_run(model, feeds) - _run(fused, feeds)).max() < 1e-5
    onnx.checker.check_model(fused)
    with pytest.raises(PueError, match="masked"):  # a plain encoder refuses a mask
        fuse_attention(model, "vision", {**layout, "kind": "encoder"})
    with pytest.raises(PueError, match="not a constant"):  # a mask computed from the inputs is no window mask
        fuse_attention(_windowed_graph(mask_from_input=True), "vision", layout)


def test_refusals(fp32_bundle):
    bundle = fp32_bundle("llava_next", "ci")
    decoder = load(bundle, "decoder")
    with pytest.raises(PueError, match="masked"):
        fuse_attention(decoder, "decoder", {"kind": "encoder", "heads": 4, "head_dim": 16})
    with pytest.raises(PueError, match="no mask"):
        fuse_attention(load(bundle, "vision"), "vision", {"kind": "causal", "heads": 4, "head_dim": 16})
    with pytest.raises(PueError, match="unknown attention kind"):
        fuse_attention(decoder, "decoder", {"kind": "sliding", "heads": 4, "head_dim": 16})
    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "plain",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )
    )
    with pytest.raises(PueError, match="no attention to fuse"):
        fuse_attention(plain, "vision", {"kind": "encoder", "heads": 1, "head_dim": 2})
    export = dataclasses.replace(read_manifest(bundle).export, attention={})
    with pytest.raises(PueError, match="re-export"):
        attention_layout(export, "decoder")


@pytest.mark.parametrize("seq", [1, 2, 3, 17])
def test_causal_split_at_any_length(fp32_bundle, seq):
    """The decoder's two blocks (ceil(seq/2) square + the rest against every key) hold for odd and tiny lengths."""
    bundle = fp32_bundle("llava_next", "ci")
    standard = load(bundle, "decoder")
    fused, _ = fuse_attention(standard, "decoder", attention_layout(read_manifest(bundle).export, "decoder"))
    rng = np.random.default_rng(seq)
    ids = rng.integers(20, 200, size=(3, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, seq // 2 + 1 :] = 0  # right padding
    hidden = read_manifest(bundle).hidden_size
    feeds = {"input_ids": ids, "attention_mask": mask, "image_features": np.zeros((3, 1, hidden), np.float32)}
    assert np.abs(_run(standard, feeds) - _run(fused, feeds)).max() < 1e-5
