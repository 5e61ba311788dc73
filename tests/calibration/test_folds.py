"""Exact smoothing folds on real exported graphs (issue 14, item 1): for each kind of fold (norm gains, the vision
tower's LayerNorms, up_proj → down_proj, v_proj → o_proj with scales tied across the query heads of a KV head and
v_proj's bias scaled), dividing the producer by s and multiplying the readers' weight rows by s leaves the FP32
outputs unchanged (cosine ≥ 0.99999 per row); inputs after a GELU have no fold."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from pue.calibration.folds import find_fold
from pue.calibration.graph_ops import weight_ops

MIN_COSINE = 0.99999


def feeds_of(bundle):
    from pue.calibration.readers import DecoderFeeds, VisionFeeds, default_captions, make_plan
    from pue.calibration.sampling import sample_patches
    from pue.calibration.sources import open_sources
    from pue.runtime import Embedder

    embedder = Embedder.load(bundle)
    patches, _ = sample_patches(open_sources(None, patch_size=embedder.manifest.tile_size), 2)
    plan = make_plan(patches, default_captions(2))
    return embedder.manifest, {
        "vision": list(VisionFeeds(embedder, plan.patches)),
        "decoder": list(DecoderFeeds(embedder, plan)),
    }


def outputs(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0].reshape(1, -1) for feed in feeds])


def sites(model, graph, layout):
    groups: dict[str, list] = {}
    for op in weight_ops(model, graph):
        if op.op_type == "MatMul":
            groups.setdefault(op.activation, []).append(op)
    found = {}
    for activation, group in groups.items():
        channels = group[0].in_channels
        site = find_fold(model, activation, {op.node for op in group}, channels, layout)
        found[activation] = (group, None if site is None else site.kind)
    return found


def fold_kind(model, graph, layout, kind, seed=0):
    """A copy of `model` with every fold of `kind` applied at a random scale in [0.25, 4] (tied where it must be)."""
    folded = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    initializers = {init.name: init for init in folded.graph.initializer}
    applied = 0
    for activation, (group, found) in sites(folded, graph, layout).items():
        if found != kind:
            continue
        site = find_fold(folded, activation, {op.node for op in group}, group[0].in_channels, layout)
        scale = site.tie(np.exp(rng.uniform(np.log(0.25), np.log(4.0), group[0].in_channels)).astype(np.float32))
        for op in group:
            weight = numpy_helper.to_array(initializers[op.weight])
            initializers[op.weight].CopyFrom(numpy_helper.from_array(weight * scale[:, None], op.weight))
        site.apply(scale)
        applied += 1
    return folded, applied


EXPECTED = {
    # arch: {graph: {kind: groups}}; None = no exact fold (an explicit Mul if smoothed)
    "llava_next": {
        "vision": {"layernorm": 2, "v_proj": 1, None: 1},
        "decoder": {"norm-gain": 2, "v_proj": 1, "up_proj": 1},
    },
    "llava": {"vision": {"layernorm": 2, "v_proj": 1, None: 1}, "decoder": {"norm-gain": 2, "v_proj": 1, "up_proj": 1}},
}


@pytest.mark.parametrize("arch", ["llava_next", "llava"])
def test_every_fold_leaves_the_fp32_function_unchanged(fp32_bundle, arch):
    bundle = fp32_bundle(arch=arch)
    manifest, feeds = feeds_of(bundle)
    for graph in ("vision", "decoder"):
        model = onnx.load(str(bundle / f"{graph}.onnx"))
        layout = manifest.export.attention.get(graph)
        kinds = [kind for _, kind in sites(model, graph, layout).values()]
        layers = sum(node.op_type == "Softmax" for node in model.graph.node)
        for kind, per_layer in EXPECTED[arch][graph].items():
            assert kinds.count(kind) >= per_layer * (layers - 1), (graph, kind, kinds)
        reference = outputs(model, feeds[graph])
        for kind in {k for k in kinds if k is not None}:
            folded, applied = fold_kind(model, graph, layout, kind)
            assert applied == kinds.count(kind)
            got = outputs(folded, feeds[graph])
            cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
            assert cosine.min() >= MIN_COSINE, (arch, graph, kind, cosine.min())
