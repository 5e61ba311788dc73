"""The parent's rows a quantization compares with: the parent's graphs with the candidates' fused attention where
they agree with the parent's own rows, else the parent's graphs; and the vision outputs a candidate whose vision graph
is unchanged does not run again."""

from __future__ import annotations

import numpy as np
import pytest

from pue.bundle import read_manifest
from pue.calibration import reference as reference_module
from pue.calibration.reference import choose_reference, fused_parent
from pue.calibration.staging import VisionMemo
from pue.data import patch_set
from pue.gate_set import GateSet
from pue.optimize.attention import attention_layout
from pue.runtime import Embedder


def _items() -> GateSet:
    images = list(patch_set("heldout"))[:3]
    return GateSet(images, ["a patch of tumour", "stroma"], images[:1], ["with more nuclei"])


@pytest.fixture(scope="module")
def parent_and_layouts(fp32_bundle):
    bundle = fp32_bundle("llava_next", "ci")
    manifest = read_manifest(bundle)
    return bundle, manifest, {name: attention_layout(manifest.export, name) for name in manifest.graphs}


def test_the_fused_parent_embeds_the_parents_rows(parent_and_layouts, tmp_path):
    bundle, manifest, layouts = parent_and_layouts
    fused = fused_parent(bundle, manifest, layouts, tmp_path / "fused")
    items = _items()
    with Embedder.load(bundle) as parent, Embedder.load(fused) as reference:
        ours, theirs = items.embed(reference), items.embed(parent)
    for kind in theirs:
        assert np.sum(ours[kind] * theirs[kind], axis=1).min() >= 0.99999
    assert {"MultiHeadAttention"} <= _op_types(fused / "vision.onnx")
    assert "MultiHeadAttention" not in _op_types(bundle / "vision.onnx")


def test_the_reference_is_the_fused_parent_only_where_it_agrees(parent_and_layouts, tmp_path, monkeypatch):
    bundle, manifest, layouts = parent_and_layouts
    items, said = _items(), []
    with Embedder.load(bundle) as parent:
        rows, record = choose_reference(parent, (bundle, manifest), layouts, tmp_path / "a", items, said.append)
        assert record["graphs"] == "parent, attention fused" and record["agreement"]["min_cosine"] >= 0.99999
        assert record["agreement"]["count"] == 4  # two patches, two texts
        fused_rows, again = rows(items, items)
        own = items.embed(parent)
        assert all(np.array_equal(fused_rows[kind], again[kind]) for kind in own)
        assert not all(np.array_equal(fused_rows[kind], own[kind]) for kind in own)  # other kernels, other rounding
        # an agreement short of the bar: the parent's own graphs embed the rows, and the record says why
        monkeypatch.setattr(reference_module, "REFERENCE_MIN_COSINE", 1.5)
        rows, record = choose_reference(parent, (bundle, manifest), layouts, tmp_path / "b", items, said.append)
        assert record["graphs"] == "parent" and record["fused_agreement"]["min_cosine"] < 1.5
        assert all(np.array_equal(rows(items)[0][kind], own[kind]) for kind in own)
        # standard attention (no layouts): the parent's graphs, nothing staged
        rows, record = choose_reference(parent, (bundle, manifest), None, tmp_path / "c", items, said.append)
        assert record == {"graphs": "parent"} and not (tmp_path / "c").exists()
    assert any("the parent's graphs embed them" in line for line in said)


class _Runner:
    def __init__(self):
        self.calls = 0
        self.name = "vision"

    def infer(self, feed):
        self.calls += 1
        return {"image_features": feed["pixel_values"].sum(axis=-1, keepdims=True) * 2.0}


def test_the_vision_memo_answers_a_batch_it_holds_for_the_same_graph_only():
    memo, runner = VisionMemo(), _Runner()
    feed = {"pixel_values": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}
    first = memo.runner(runner, ("a",)).infer(feed)
    again = memo.runner(runner, ("a",)).infer(dict(feed))
    assert runner.calls == 1 and memo.hits == 1 and np.array_equal(first["image_features"], again["image_features"])
    again["image_features"][:] = 0  # the caller's copy: the memo keeps its own
    assert np.array_equal(memo.runner(runner, ("a",)).infer(feed)["image_features"], first["image_features"])
    other = {"pixel_values": feed["pixel_values"] + 1}
    memo.runner(runner, ("a",)).infer(other)  # another batch
    assert runner.calls == 2
    memo.runner(runner, ("b",)).infer(feed)  # another graph: nothing reused, the memo starts again
    assert runner.calls == 3 and memo.key == ("b",) and len(memo.outputs) == 1
    assert memo.runner(runner, ("b",)).name == "vision"  # the rest is the runner's
    small = VisionMemo(limit_bytes=10)
    small.runner(runner, ("a",)).infer(feed)
    assert not small.outputs  # over the limit: run, not kept


def _op_types(path):
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
