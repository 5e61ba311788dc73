"""The PMEB harness with deterministic fake embedders: rows, reference comparison, caching, interruption, sha check.

No bundle graphs, no torch: bundles here are bare manifests, and `open_embedder` / `load_reference` /
`checkpoint_identity` are replaced by doubles whose vectors come from hashing concepts in file names and texts.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pue.benchmarks.pmeb import discover_tasks, evaluate_task, load_task, pmeb_mini_dir, run_pmeb, runner
from pue.benchmarks.pmeb.runner import ReferenceMismatchError
from pue.bundle import (
    FileEntry,
    ImagePreprocessing,
    Manifest,
    Prompts,
    SourceCheckpoint,
    TokenizerInfo,
    write_manifest,
)
from pue.errors import BundleError, PueError

DIM = 16
SHA = "ab" * 32
VOCABULARY = ("red", "blue", "green")


def _vector(key: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=DIM)


class FakeEmbedder:
    """Images mean the colour their file name starts with; texts the first colour word they contain."""

    def __init__(self, noise: float = 0.0, salt: str = "", interrupt_on: str | None = None) -> None:
        self.noise, self.salt, self.interrupt_on = noise, salt, interrupt_on
        self.calls: Counter[str] = Counter()

    def _unit(self, concept: str, key: str) -> np.ndarray:
        vector = _vector(concept) + self.noise * _vector(self.salt + key)
        return vector / np.linalg.norm(vector)

    @staticmethod
    def _text_concept(text: str) -> str:
        return next((w for w in VOCABULARY if w in text.lower()), text)

    def embed_images(self, images):
        self.calls["images"] += 1
        return np.stack([self._unit(Path(p).stem.split("_")[0], str(p)) for p in images]).astype(np.float32)

    def embed_texts(self, texts):
        self.calls["texts"] += 1
        if self.interrupt_on and any(self.interrupt_on in t for t in texts):
            raise KeyboardInterrupt
        return np.stack([self._unit(self._text_concept(t), t) for t in texts]).astype(np.float32)

    def embed_composed(self, images, texts):
        self.calls["composed"] += 1
        out = self.embed_images(images) + 0.3 * self.embed_texts(texts)
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def embed_image_sets(self, image_sets):
        self.calls["image_sets"] += 1
        out = np.stack([self.embed_images(images).mean(axis=0) for images in image_sets])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def write_task(folder: Path, spec: dict, files: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps(spec))
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "pmeb"
    for name in ("red_1.png", "red_2.png", "blue_1.png", "green_1.png"):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / "images" / name)
    pairs = [
        {"img": "red_1.png", "caption": "red tissue"},
        {"img": "red_2.png", "caption": "red tissue"},
        {"img": "blue_1.png", "caption": "blue tissue"},
        {"img": "green_1.png", "caption": "green tissue"},
    ]
    write_task(
        root / "a_retrieval",
        {"name": "colour_retrieval", "meta_task": "retrieval", "data": "pairs.json", "image_root": "../images"},
        {"pairs.json": pairs},
    )
    prompts = {
        "colours": {
            "classnames": {c: [c, f"{c} stain"] for c in VOCABULARY},
            "templates": ["an image of CLASSNAME.", "CLASSNAME"],
        }
    }
    labels = "image_name,label\nred_1.png,red\nred_2.png,red\nblue_1.png,blue\ngreen_1.png,green\n"
    write_task(
        root / "b_zeroshot",
        {
            "name": "colour_zeroshot",
            "meta_task": "classification",
            "labels": "labels.csv",
            "prompts": "prompts.json",
            "image_root": "../images",
        },
        {"labels.csv": labels, "prompts.json": prompts},
    )
    questions = [
        {"image": p["img"], "question": "Which colour?", "key_finding_text": p["caption"].split()[0]} for p in pairs
    ]
    write_task(
        root / "c_vqa",
        {"name": "colour_vqa", "meta_task": "composed_retrieval", "data": "vqa.json", "image_root": "../images"},
        {"vqa.json": questions},
    )
    return root


def make_bundle(folder: Path, precision: str = "fp32", source_sha256: str = SHA, tile_size: int = 224) -> Path:
    """A bundle directory holding only its manifest: enough for the harness, which opens it via open_embedder."""
    folder.mkdir(parents=True)
    empty = FileEntry(path="none", sha256="0" * 64, size=0)
    manifest = Manifest(
        architecture="llava_next",
        precision=precision,
        target="onnxruntime",
        backend="onnxruntime",
        graphs={},
        tile_size=tile_size,
        preprocessing=ImagePreprocessing("anyres", tile_size, 224, 2, [0.5] * 3, [0.5] * 3, 1 / 255, 3),
        recipe={"name": "e5v", "user": {}, "assistant_prefix": " \n", "pooling": "last_token"},
        prompts=Prompts("<image>", "{text}", "<image>{text}", "<image>"),
        pooling="last_token",
        tokenizer=TokenizerInfo(file=empty, pad_token_id=0),
        image_token_id=5,
        tokens_per_image=4,
        embedding_dim=DIM,
        hidden_size=DIM,
        max_seq_len=64,
        default_batch_size=2,
        source_checkpoint=SourceCheckpoint(name="tiny", sha256=source_sha256, model_type="llava_next"),
    )
    write_manifest(folder, manifest)
    return folder


@pytest.fixture
def fakes(monkeypatch):
    """Doubles for the heavy seams; `fakes["reference_loads"]` counts reference loads."""
    state = {"reference_loads": 0, "interrupt_on": None, "embedders": {}}

    def open_embedder(path, device):
        embedder = FakeEmbedder(noise=0.3, salt=Path(path).name, interrupt_on=state["interrupt_on"])
        state["embedders"][Path(path).name] = embedder
        return embedder

    def load_reference(checkpoint, device, dtype, bundle):
        state["reference_loads"] += 1
        return FakeEmbedder()

    monkeypatch.setattr(runner, "open_embedder", open_embedder)
    monkeypatch.setattr(runner, "load_reference", load_reference)
    monkeypatch.setattr(runner, "checkpoint_identity", lambda path: ("tiny", SHA))
    return state


# --- evaluate_task ------------------------------------------------------------------------------------
def test_evaluate_task_scores_and_keeps_embeddings(data_dir):
    results = {t.name: evaluate_task(t, FakeEmbedder()) for t in discover_tasks(data_dir)}
    retrieval = results["colour_retrieval"]
    # 3 distinct captions and 4 images: recall@k only for k below the gallery size
    assert retrieval.metrics == {
        "image_to_text_recall@1": 1.0,
        "text_to_image_recall@1": 1.0,
        # HOMIE's record-level pairs: red_2's caption duplicates red_1's (a negative), and the tie goes to record 0
        "homie_text_to_image_recall@1": 0.75,
        "homie_image_to_text_recall@1": 0.75,
    }
    assert retrieval.homie_names["homie_text_to_image_recall@1"] == "image_retrieval_recall@1"
    assert retrieval.predictions["image_to_text"].tolist() == [0, 0, 1, 2]
    assert retrieval.embeddings["images"].shape == (4, DIM) and retrieval.embeddings["captions"].shape == (3, DIM)
    zeroshot = results["colour_zeroshot"]
    assert zeroshot.metrics == {"accuracy": 1.0, "balanced_accuracy": 1.0, "weighted_f1": 1.0}
    assert zeroshot.predictions["class"].tolist() == [0, 0, 1, 2]
    assert zeroshot.embeddings["prompts"].shape == (12, DIM)  # 3 classes × 2 synonyms × 2 templates
    vqa = results["colour_vqa"]
    assert vqa.metrics["recall@1"] == 1.0 and vqa.predictions["target"].tolist() == [0, 0, 1, 2]
    # answer → query: "red" has two correct queries (pue); HOMIE's record 1 loses its tie to record 0
    assert vqa.metrics["answer_to_query_recall@1"] == 1.0 and vqa.metrics["homie_answer_to_query_recall@1"] == 0.75


def test_multi_image_retrieval_scores_sets_against_captions(tmp_path):
    """A set of red tiles is one query whose caption says red: each set retrieves its caption and back."""
    folder = tmp_path / "regions"
    names = ["red_1.png", "red_2.png", "blue_1.png", "blue_2.png", "blue_3.png", "blue_4.png", "green_1.png"]
    records = [
        {"img": ["red_1.png", "red_2.png"], "caption": "a red region"},
        {"img": ["blue_1.png", "blue_2.png", "blue_3.png", "blue_4.png"], "caption": "four blue tiles"},
        {"img": ["green_1.png"], "caption": "green"},
    ]
    write_task(folder, {"meta_task": "multi_image_retrieval", "data": "data.json"}, {"data.json": records})
    for name in names:
        Image.new("RGB", (8, 8)).save(folder / name)
    embedder = FakeEmbedder(noise=0.2)
    result = evaluate_task(load_task(folder), embedder)
    assert embedder.calls["image_sets"] == 1 and embedder.calls["images"] == 3  # one call, each set's images
    assert result.embeddings["images"].shape == (3, DIM)
    assert result.metrics["image_to_text_recall@1"] == 1.0 and result.metrics["text_to_image_recall@1"] == 1.0
    assert result.metrics["homie_text_to_image_recall@1"] == 1.0
    assert result.homie_names["homie_image_to_text_recall@1"] == "text_retrieval_recall@1"


def test_broken_embeddings_are_refused(data_dir):
    class NaNEmbedder(FakeEmbedder):
        def embed_images(self, images):
            out = super().embed_images(images)
            out[1] = np.nan
            return out

    task = discover_tasks(data_dir, ["colour_zeroshot"])[0]
    with pytest.raises(PueError, match="1 of the images embeddings hold NaN or inf"):
        evaluate_task(task, NaNEmbedder())


# --- run_pmeb -----------------------------------------------------------------------------------------
def test_run_without_reference(tmp_path, data_dir, fakes):
    bundle = make_bundle(tmp_path / "bundle-fp32")
    report = run_pmeb([bundle], data_dir, report_dir=tmp_path / "report")
    assert report["schema_version"] == 1 and report["status"] == "complete"
    assert {"cpu", "versions"} <= set(report["environment"])
    rows = report["results"]
    assert {r["task"] for r in rows} == {"colour_retrieval", "colour_zeroshot", "colour_vqa"}
    for row in rows:
        assert (row["name"], row["backend"], row["precision"]) == ("bundle-fp32", "onnxruntime", "fp32")
        for key in ("reference_value", "delta", "prediction_agreement", "mean_cosine_vs_reference"):
            assert row[key] is None
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == report
    assert "| task | metric | bundle-fp32 (onnxruntime fp32) | Δ |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "pmeb.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]  # no temp files left


def test_run_with_reference(tmp_path, data_dir, fakes):
    bundles = [make_bundle(tmp_path / "b-fp32"), make_bundle(tmp_path / "b-int8", precision="int8")]
    report = run_pmeb(
        bundles, data_dir, reference=tmp_path / "ckpt", cache_dir=tmp_path / "cache", report_dir=tmp_path / "report"
    )
    rows = report["results"]
    assert report["config"]["reference"]["sha256"] == SHA
    reference_rows = [r for r in rows if r["backend"] == "pytorch"]
    assert {(r["name"], r["precision"]) for r in reference_rows} == {("tiny", "fp32")}
    assert all(r["delta"] == 0.0 and r["prediction_agreement"] == 1.0 for r in reference_rows)
    by_key = {(r["name"], r["task"], r["metric"]): r for r in rows}
    for row in rows:
        reference = by_key[("tiny", row["task"], row["metric"])]
        assert row["reference_value"] == reference["value"]
        assert row["delta"] == pytest.approx(row["value"] - reference["value"])
        assert 0.0 <= row["prediction_agreement"] <= 1.0
        assert 0.8 < row["mean_cosine_vs_reference"] <= 1.0 + 1e-9
    # the agreement is the share of equal top-1 predictions, checked against a direct computation
    fake = FakeEmbedder(noise=0.3, salt="b-int8")
    task = discover_tasks(data_dir, ["colour_zeroshot"])[0]
    mine, ref = evaluate_task(task, fake), evaluate_task(task, FakeEmbedder())
    expected = float(np.mean(mine.predictions["class"] == ref.predictions["class"]))
    assert by_key[("b-int8", "colour_zeroshot", "accuracy")]["prediction_agreement"] == expected
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "tiny (pytorch fp32)" in markdown and "Agreement with the reference" in markdown


def test_reference_embeddings_are_cached(tmp_path, data_dir, fakes, monkeypatch):
    bundle = make_bundle(tmp_path / "bundle")
    first = run_pmeb([bundle], data_dir, reference=tmp_path / "ckpt", cache_dir=tmp_path / "cache")
    assert fakes["reference_loads"] == 1
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference was loaded although every task is cached")

    monkeypatch.setattr(runner, "load_reference", no_reference)
    second = run_pmeb([bundle], data_dir, reference=tmp_path / "ckpt", cache_dir=tmp_path / "cache")
    assert second["results"] == first["results"]

    # changing a task's data misses the cache for that task only
    monkeypatch.setattr(
        runner, "load_reference", lambda *a, **k: fakes.__setitem__("reference_loads", 9) or FakeEmbedder()
    )
    labels = data_dir / "b_zeroshot" / "labels.csv"
    labels.write_text(labels.read_text().replace("green_1.png,green\n", ""))
    run_pmeb([bundle], data_dir, reference=tmp_path / "ckpt", cache_dir=tmp_path / "cache")
    assert fakes["reference_loads"] == 9
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    from pue.benchmarks.pmeb.cache import default_cache_dir

    monkeypatch.setenv("PUE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "pmeb"
    monkeypatch.delenv("PUE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "pue" / "pmeb"


def test_interrupted_run_keeps_finished_tasks(tmp_path, data_dir, fakes):
    fakes["interrupt_on"] = "stain"  # only the zero-shot prompts say "stain": the second task raises
    bundle = make_bundle(tmp_path / "bundle")
    with pytest.raises(KeyboardInterrupt):
        run_pmeb([bundle], data_dir, report_dir=tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["status"] == "interrupted"
    assert {r["task"] for r in saved["results"]} == {"colour_retrieval"}
    assert "colour_retrieval" in (tmp_path / "report" / "report.md").read_text()


def test_reference_must_be_the_bundles_source(tmp_path, data_dir, fakes):
    good, other = make_bundle(tmp_path / "good"), make_bundle(tmp_path / "other", source_sha256="cd" * 32)
    with pytest.raises(
        ReferenceMismatchError,
        match=r"not the source checkpoint of: other from 'tiny' \(sha256 "
        r"cdcdcdcdcdcd",
    ) as caught:
        run_pmeb([good, other], data_dir, reference=tmp_path / "ckpt", report_dir=tmp_path / "report")
    assert isinstance(caught.value, PueError)
    assert fakes["reference_loads"] == 0 and not fakes["embedders"]  # refused before any model ran
    assert not (tmp_path / "report").exists()


def test_reference_sha256_is_the_checkpoints_recorded_one(tmp_path):
    """The real identity function: sha256 over weight-file names and their sha256s, as pue-export records it."""
    pytest.importorskip("torch")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    expected = hashlib.sha256(b"model.safetensors" + hashlib.sha256(b"weights").hexdigest().encode()).hexdigest()
    assert runner.checkpoint_identity(checkpoint) == ("ckpt", expected)
    bundles = [runner.read_bundle_info(make_bundle(tmp_path / "b", source_sha256=expected))]
    assert runner.check_reference(checkpoint, bundles) == ("ckpt", expected)
    (checkpoint / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ReferenceMismatchError):
        runner.check_reference(checkpoint, bundles)


def test_bad_arguments(tmp_path, data_dir, fakes):
    with pytest.raises(PueError, match="no bundle"):
        run_pmeb([], data_dir)
    with pytest.raises(BundleError, match="not a pue bundle"):
        run_pmeb([tmp_path], data_dir)
    with pytest.raises(PueError, match="no task named 'nope'"):
        run_pmeb([make_bundle(tmp_path / "b")], data_dir, tasks=["nope"])


def test_pmeb_mini_runs_end_to_end(tmp_path, fakes):
    report = run_pmeb(
        [make_bundle(tmp_path / "bundle")], pmeb_mini_dir(), reference=tmp_path / "ckpt", cache_dir=tmp_path / "cache"
    )
    assert {r["task"] for r in report["results"]} == {
        "mini_caption_retrieval",
        "mini_composed",
        "mini_stain_zeroshot",
        "mini_tissue_zeroshot",
    }


def test_environment_is_the_shared_record():
    environment = runner.collect_environment()
    assert "hostname" in environment and "timestamp" in environment  # pue.benchmarks.environment's record
    assert environment["cpu"]["usable_cores"] >= 1 and environment["versions"]["pue"]


def test_harness_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['onnxruntime'] = None\n"
        "import pue.benchmarks.pmeb, pue.benchmarks.pmeb.runner, pue.benchmarks.pmeb.convert\n"
        "assert 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
