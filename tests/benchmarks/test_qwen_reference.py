"""`pue-bench latency` and `pmeb` with the PyTorch reference on a Qwen3-VL bundle whose recipe allows a Matryoshka
cut: the reference cuts and renormalises to the bundle's `embedding_dim` as the runtime does, and its FLOPs come from
the graphs (a native-resolution tower is not a fixed-size ViT the config count knows)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from qwen_helpers import MATRYOSHKA_CUT, small_heldout  # noqa: E402

from pue.benchmarks import latency  # noqa: E402
from pue.benchmarks.latency_worker import _ReferenceTarget, run_worker  # noqa: E402


def retrieval_task(root):
    """One retrieval task of four held-out tiles and their captions."""
    images = root / "images"
    images.mkdir(parents=True)
    captions = ["H&E stained tumour", "H&E stained stroma", "H&E stained gland", "IHC stained tissue"]
    pairs = []
    for path, caption in zip(small_heldout(), captions, strict=True):
        shutil.copy(path, images / path.name)
        pairs.append({"img": path.name, "caption": caption})
    task = root / "retrieval"
    task.mkdir()
    (task / "task.json").write_text(
        json.dumps({"name": "tiles", "meta_task": "retrieval", "data": "pairs.json", "image_root": "../images"})
    )
    (task / "pairs.json").write_text(json.dumps(pairs))
    return root


def test_pmeb_reference_cuts_to_the_bundles_matryoshka_dimension(qwen3_embedding_bundle, tiny_checkpoint, tmp_path):
    from pue.benchmarks.pmeb import run_pmeb

    saved = tmp_path / "embeddings"
    report = run_pmeb(
        [qwen3_embedding_bundle],
        retrieval_task(tmp_path / "pmeb"),
        reference=tiny_checkpoint("qwen3_vl", "ci"),
        cache_dir=tmp_path / "cache",
        embeddings_output=saved,
    )
    assert report["status"] == "complete"
    bundle_rows = [row for row in report["results"] if row["backend"] != "pytorch"]
    assert bundle_rows and all(row["mean_cosine_vs_reference"] >= 0.9999 for row in bundle_rows), bundle_rows
    assert all(row["delta"] == 0 for row in bundle_rows)
    for run in saved.iterdir():  # the reference's and the bundle's embeddings, both cut
        with np.load(next(run.glob("*.npz"))) as data:
            widths = {data[key].shape[-1] for key in data.files if data[key].dtype == np.float32}
        assert widths == {MATRYOSHKA_CUT}, (run.name, widths)


def test_latency_reference_cuts_alike_and_counts_flops_from_the_graphs(
    qwen3_embedding_bundle, tiny_checkpoint, monkeypatch
):
    """The workers run in this process (a subprocess per worker would import torch again)."""
    from pue.runtime import Embedder

    outputs: dict[str, np.ndarray] = {}
    embed = _ReferenceTarget.embed

    def recording(self, images):
        outputs["reference"] = embed(self, images)
        return outputs["reference"]

    def in_process(spec, timeout_s=None):
        lines: list[str] = []
        run_worker(spec, emit=lines.append)
        return latency.parse_worker_output("\n".join(lines))

    monkeypatch.setattr(_ReferenceTarget, "embed", recording)
    monkeypatch.setattr(latency, "run_worker_process", in_process)
    images = [str(path) for path in small_heldout()[:2]]
    report = latency.run_latency(
        [qwen3_embedding_bundle],
        reference=tiny_checkpoint("qwen3_vl", "ci"),
        batch_sizes=[2],
        warmup=0,
        iters=1,
        threads=1,
        reference_precisions=["fp32"],
        images=images,
        peaks=False,
    )
    rows = {row["name"]: row for row in report["results"]}
    assert set(rows) == {"pytorch fp32", qwen3_embedding_bundle.name}
    assert not any(row.get("error") for row in rows.values()), rows
    assert report["models"][0]["flops"]["source"] == "graph"
    assert all(row["flops_per_item"] == report["models"][0]["flops"]["total"] for row in rows.values())
    with Embedder.load(qwen3_embedding_bundle) as embedder:
        expected = embedder.embed_images(images)
    assert outputs["reference"].shape == (2, MATRYOSHKA_CUT)
    assert np.sum(outputs["reference"] * expected, axis=1).min() >= 0.9999
