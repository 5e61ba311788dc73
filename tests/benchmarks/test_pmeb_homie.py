"""HOMIE's metrics computed HOMIE's way, multiple choice, and saved embeddings in HOMIE's npz layout.

HOMIE's definitions are recomputed here independently, by hand: one embedding per record (the embedder called
per record, not pue's distinct items expanded), scores pair by pair, and torch.topk's CUDA tie rule written as
a sort by (score descending, index ascending).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from homie_set import COMPOSED, LABELS, MCQ, PROMPTS, RETRIEVAL, VQA, build_homie_set
from test_pmeb_runner import SHA, make_bundle

from pue.benchmarks.pmeb import discover_tasks, evaluate_task, run_pmeb, runner
from pue.benchmarks.pmeb.saved import read_saved_embeddings
from pue.benchmarks.pmeb.topk import top1 as topk_top1
from pue.benchmarks.pmeb.topk import topk_hits
from pue.errors import PueError

DIM = 12


def _vector(key: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=DIM)


def _unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class ConceptEmbedder:
    """Deterministic: an image means its stain (file prefix), a text the stain words it names; plus an item's own
    noise, so that only identical items tie exactly."""

    @staticmethod
    def _concept(text: str) -> str:
        lowered = text.lower()
        return "ihc" if ("ihc" in lowered or "dab" in lowered or "immuno" in lowered) else "he"

    def embed_images(self, images):
        return np.stack([_unit(_vector(Path(p).name[:3]) + 0.8 * _vector(Path(p).name)) for p in images])

    def embed_texts(self, texts):
        return np.stack([_unit(_vector(self._concept(t)) + 0.8 * _vector(t)) for t in texts])

    def embed_composed(self, images, texts):
        both = 0.4 * self.embed_images(images) + self.embed_texts(texts)
        return np.stack([_unit(v) for v in both])


# --- HOMIE, by hand ----------------------------------------------------------------------------------------
def homie_recall(query_rows: np.ndarray, gallery: np.ndarray, positives: list[int], k: int) -> float:
    """Share of rows whose positive is in torch.topk's k (CUDA: ties go to the lowest index)."""
    hits = []
    for row, positive in zip(query_rows, positives, strict=True):
        scores = [float(np.dot(row.astype(np.float64), g.astype(np.float64))) for g in gallery]
        order = sorted(range(len(gallery)), key=lambda j: (-scores[j], j))
        hits.append(positive in order[:k])
    return float(np.mean(hits))


def test_tie_rules_by_hand():
    scores = np.array([[0.5, 0.5, 0.5, 0.5], [0.9, 0.5, 0.5, 0.1], [0.2, 0.7, 0.7, 0.7]], dtype=np.float32)
    # CUDA: strictly greater first, then equal scores in index order
    assert topk_hits(scores, np.array([0, 2, 3]), 1).tolist() == [True, False, False]
    assert topk_hits(scores, np.array([3, 2, 3]), 2).tolist() == [False, False, False]
    assert topk_hits(scores, np.array([1, 2, 2]), 2).tolist() == [True, False, True]
    assert topk_top1(scores).tolist() == [0, 0, 1]
    # CPU (libstdc++'s nth_element for k * 64 > n): four equal scores, k = 1 → index 2, not 0
    assert topk_top1(scores[:1], "cpu").tolist() == [2]
    assert topk_hits(scores[:1], np.array([2]), 1, "cpu").tolist() == [True]


def test_cpu_tie_rule_is_torch_topk_on_the_cpu():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for n in (3, 4, 7, 16, 63, 64, 65, 130, 700):  # both nth_element (k * 64 > n) and partial_sort
        scores = rng.integers(0, 3, size=(40, n)).astype(np.float32)
        positives = rng.integers(0, n, size=40)
        for k in sorted({1, min(5, n), min(10, n)}):
            chosen = torch.topk(torch.from_numpy(scores), k, dim=1).indices.numpy()
            want = [positives[r] in chosen[r] for r in range(40)]
            assert topk_hits(scores, positives, k, "cpu").tolist() == want, (n, k)
        assert topk_top1(scores, "cpu").tolist() == torch.topk(torch.from_numpy(scores), 1).indices[:, 0].tolist()


@pytest.fixture
def homie_dir(tmp_path: Path) -> Path:
    return build_homie_set(tmp_path / "homie")


def test_homie_metrics_equal_an_independent_computation(homie_dir):
    fake = ConceptEmbedder()
    results = {t.name: evaluate_task(t, fake) for t in discover_tasks(homie_dir)}
    root = discover_tasks(homie_dir, ["retrieval"])[0].image_root
    path = lambda names: [str(root / n) for n in names]  # noqa: E731

    # retrieval: HOMIE scores caption-record rows against image-record columns, positives on the diagonal
    images = fake.embed_images(path([r["img"] for r in RETRIEVAL]))
    captions = fake.embed_texts([r["caption"] for r in RETRIEVAL])
    diagonal = list(range(len(RETRIEVAL)))
    retrieval = results["retrieval"]
    for k in (1, 5):
        assert retrieval.metrics[f"homie_text_to_image_recall@{k}"] == homie_recall(captions, images, diagonal, k)
        assert retrieval.metrics[f"homie_image_to_text_recall@{k}"] == homie_recall(images, captions, diagonal, k)
        assert retrieval.homie_names[f"homie_text_to_image_recall@{k}"] == f"image_retrieval_recall@{k}"
        assert retrieval.homie_names[f"homie_image_to_text_recall@{k}"] == f"text_retrieval_recall@{k}"
    # the duplicated caption is a negative for HOMIE (record 1 loses the tie to record 0), not for pue
    assert retrieval.metrics["homie_image_to_text_recall@1"] < retrieval.metrics["image_to_text_recall@1"]

    # VQA: each answer (record) retrieves its own query; pue's query → answer over distinct answers stays
    queries = fake.embed_composed(path([r["image"] for r in VQA]), [r["question"] for r in VQA])
    answers = fake.embed_texts([r["key_finding_text"] for r in VQA])
    vqa = results["vqa"]
    for k in (1, 5):
        want = homie_recall(answers, queries, list(range(len(VQA))), k)
        assert vqa.metrics[f"homie_answer_to_query_recall@{k}"] == want
        assert vqa.homie_names[f"homie_answer_to_query_recall@{k}"] == f"query_retrieval_recall@{k}"
    assert {"recall@1", "answer_to_query_recall@1"} <= set(vqa.metrics)  # pue's, both directions

    # composed: queries against the distinct targets sorted by name
    gallery = sorted({r["target_image"] for r in COMPOSED})
    targets = fake.embed_images(path(gallery))
    queries = fake.embed_composed(path([r["source_image"] for r in COMPOSED]), [r["modifier"] for r in COMPOSED])
    positives = [gallery.index(r["target_image"]) for r in COMPOSED]
    assert results["composed"].metrics["homie_recall@1"] == homie_recall(queries, targets, positives, 1)

    # zero-shot: the mean of each class's synonym × template prompts, renormalised; argmax
    classes = []
    for synonyms in PROMPTS["stain"]["classnames"].values():
        texts = [t.replace("CLASSNAME", s) for s in synonyms for t in PROMPTS["stain"]["templates"]]
        classes.append(_unit(fake.embed_texts(texts).astype(np.float64).mean(axis=0)))
    predicted = (fake.embed_images(path([i for i, _ in LABELS])) @ np.stack(classes).T).argmax(axis=1)
    truth = np.array([list(PROMPTS["stain"]["classnames"]).index(label) for _, label in LABELS])
    zeroshot = results["zeroshot"]
    assert zeroshot.metrics["accuracy"] == np.mean(predicted == truth)
    recalls = [np.mean(predicted[truth == c] == c) for c in np.unique(truth)]
    assert zeroshot.metrics["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert zeroshot.homie_names == {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy"}

    # multiple choice: each record's own options (2, 3, 4, 3 of them), the best one right when it is the answer
    right = []
    for record in MCQ:
        query = fake.embed_composed(path([record["img"]]), [record["question"]])[0]
        options = fake.embed_texts(record["options"])
        right.append(record["options"][int(np.argmax(options @ query))] == record["answer"])
    assert results["mcq"].metrics["homie_accuracy"] == np.mean(right)
    assert results["mcq"].metrics["accuracy"] == np.mean(right)  # no exact ties here: pue's rule agrees
    assert results["mcq"].homie_names == {"homie_accuracy": "accuracy"}


def test_multiple_choice_ties_by_hand(tmp_path):
    """Two options with the same text tie exactly: HOMIE takes the first (argmax), pue counts a tie against."""
    root = build_homie_set(tmp_path / "set")
    data = [
        {"No": 1, "img": MCQ[0]["img"], "question": "q", "options": ["same", "same", "answer"], "answer": "answer"},
        {"No": 2, "img": MCQ[0]["img"], "question": "q", "options": ["answer", "same"], "answer": "answer"},
    ]
    (root / "mcq" / "test.json").write_text(json.dumps(data))
    task = discover_tasks(root, ["mcq"])[0]

    class Fixed:  # the query scores "same" 0.8 and "answer" 0.8 (a tie), or "answer" 0.6 (a miss)
        def embed_composed(self, images, texts):
            return np.array([[1.0, 0.0, 0.0]] * len(images), np.float32)

        def embed_texts(self, texts):
            table = {"same": [0.8, 0.6, 0.0], "answer": [0.8, 0.0, 0.6]}
            return np.array([table[t] for t in texts], np.float32)

    result = evaluate_task(task, Fixed())
    # record 1: options score 0.8, 0.8, 0.8 → HOMIE picks option 0 ("same"): wrong; pue: a tie: wrong
    # record 2: 0.8, 0.8 → HOMIE picks option 0 ("answer"): right; pue: tied with a wrong option: wrong
    assert result.metrics == {"accuracy": 0.0, "homie_accuracy": 0.5}
    assert result.predictions["option"].tolist() == [0, 0]


def test_multiple_choice_answer_must_be_an_option(homie_dir):
    data = [{"No": 1, "img": MCQ[0]["img"], "question": "q", "options": ["a", "b"], "answer": "B"}]
    (homie_dir / "mcq" / "test.json").write_text(json.dumps(data))
    with pytest.raises(PueError, match="answer 'B' is not one of its options"):
        discover_tasks(homie_dir, ["mcq"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_weighted_f1_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from pue.benchmarks.pmeb import metrics

    rng = np.random.default_rng(1)
    for _ in range(50):
        classes = int(rng.integers(2, 6))
        true = rng.integers(0, classes, size=int(rng.integers(3, 40)))
        pred = rng.integers(0, classes + 1, size=len(true))  # sometimes a class never in the labels
        assert metrics.balanced_accuracy(true, pred) == pytest.approx(
            sklearn_metrics.balanced_accuracy_score(true, pred)
        )
        assert metrics.weighted_f1(true, pred) == pytest.approx(
            sklearn_metrics.f1_score(true, pred, average="weighted", zero_division=0)
        )


# --- saved embeddings --------------------------------------------------------------------------------------
@pytest.fixture
def concept_fakes(monkeypatch):
    monkeypatch.setattr(runner, "open_embedder", lambda path, device: ConceptEmbedder())
    monkeypatch.setattr(runner, "load_reference", lambda *args: ConceptEmbedder())
    monkeypatch.setattr(runner, "checkpoint_identity", lambda path: ("tiny", SHA))


def _values(report: dict) -> dict:
    return {(r["name"], r["task"], r["metric"]): (r["value"], r["homie_name"]) for r in report["results"]}


@pytest.mark.parametrize("tie_order", ["cuda", "cpu"])
def test_saved_embeddings_reproduce_the_run(tmp_path, homie_dir, concept_fakes, tie_order):
    bundle = make_bundle(tmp_path / "b-fp32")
    first = run_pmeb(
        [bundle],
        homie_dir,
        reference=tmp_path / "ckpt",
        cache_dir=tmp_path / "cache",
        embeddings_output=tmp_path / "saved",
        tie_order=tie_order,
    )
    files = sorted((tmp_path / "saved").glob("*/*.npz"))
    assert [f"{p.parent.name}/{p.name}" for p in files] == [
        f"{run}/{task}.npz"
        for run in ("b-fp32", "tiny")
        for task in ("composed", "mcq", "retrieval", "vqa", "zeroshot")
    ]
    again = run_pmeb([], homie_dir, embeddings=files, tie_order=tie_order, report_dir=tmp_path / "report")
    assert _values(again) == _values(first)
    assert {(r["name"], r["backend"]) for r in again["results"]} == {("b-fp32", "onnxruntime"), ("tiny", "pytorch")}

    saved = np.load(tmp_path / "saved" / "b-fp32" / "mcq.npz")
    assert str(saved["task"]) == "mcq" and saved["candidate_embeddings"].shape == (12, DIM)  # 2 + 3 + 4 + 3 options
    assert saved["query_ids"].tolist() == [0, 1, 2, 3]


def test_a_homie_file_with_unsorted_ids(tmp_path, homie_dir, concept_fakes):
    """HOMIE's own files: embeddings sorted by id, ids in gathering order, no pue keys (matched by kind and size)."""
    run_pmeb([make_bundle(tmp_path / "b")], homie_dir, embeddings_output=tmp_path / "saved")
    ours = dict(np.load(tmp_path / "saved" / "b" / "retrieval.npz"))
    homie = {key: ours[key] for key in ("query_embeddings", "candidate_embeddings", "task")}
    homie["query_ids"] = np.array([0, 3, 1, 4, 2, 5])  # two processes, interleaved
    homie["candidate_ids"] = np.array([0, 3, 1, 4, 2, 5])
    np.savez(tmp_path / "homie.npz", **homie, model_id="HOMIE-8B", data_path="test.json")
    report = run_pmeb([], homie_dir, embeddings=[tmp_path / "homie.npz"])
    rows = {r["metric"]: r for r in report["results"]}
    assert {r["name"] for r in report["results"]} == {"HOMIE-8B"} and {r["task"] for r in rows.values()} == {
        "retrieval"
    }
    first = run_pmeb([make_bundle(tmp_path / "b2")], homie_dir, tasks=["retrieval"])
    assert {r["metric"]: r["value"] for r in first["results"]} == {m: r["value"] for m, r in rows.items()}

    homie["query_ids"] = np.array([0, 0, 1, 2, 3, 4])
    np.savez(tmp_path / "broken.npz", **homie)
    with pytest.raises(PueError, match="query_ids are not the record positions"):
        read_saved_embeddings(tmp_path / "broken.npz")
    homie["query_ids"] = np.arange(6)
    np.savez(tmp_path / "vqa.npz", **{**homie, "task": "vqa"})
    with pytest.raises(PueError, match="no task folder"):
        run_pmeb([], homie_dir, embeddings=[tmp_path / "vqa.npz"])
    with pytest.raises(PueError, match="either bundles or --embeddings"):
        run_pmeb([make_bundle(tmp_path / "b3")], homie_dir, embeddings=[tmp_path / "homie.npz"])


def test_cli_scores_saved_embeddings(tmp_path, homie_dir, concept_fakes):
    from typer.testing import CliRunner

    from pue.cli.bench_app import app

    run_pmeb([make_bundle(tmp_path / "b")], homie_dir, embeddings_output=tmp_path / "saved")
    out = CliRunner().invoke(
        app, ["pmeb", "--embeddings", str(tmp_path / "saved" / "b" / "vqa.npz"), "--data", str(homie_dir), "--json"]
    )
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert {r["homie_name"] for r in report["results"]} >= {"query_retrieval_recall@1"}
    refused = CliRunner().invoke(app, ["pmeb", "--data", str(homie_dir)])
    assert refused.exit_code == 1 and "no bundle" in refused.output


# --- the real FP32 bundle against its reference ------------------------------------------------------------
def test_fp32_bundle_agrees_with_the_reference_on_every_task_kind(tmp_path, homie_dir, fp32_bundle, tiny_checkpoint):
    report = run_pmeb(
        [fp32_bundle()],
        homie_dir,
        reference=tiny_checkpoint(),
        cache_dir=tmp_path / "cache",
        embeddings_output=tmp_path / "saved",
    )
    rows = [r for r in report["results"] if r["backend"] != "pytorch"]
    assert {r["meta_task"] for r in rows} == {"retrieval", "classification", "composed_retrieval", "multiple_choice"}
    assert {r["homie_name"] for r in rows} >= {
        "image_retrieval_recall@1",
        "text_retrieval_recall@1",
        "query_retrieval_recall@1",
        "accuracy",
        "balanced_accuracy",
    }
    for row in rows:
        assert row["prediction_agreement"] >= 0.99, row
        assert row["mean_cosine_vs_reference"] > 0.9999, row
    again = run_pmeb([], homie_dir, embeddings=sorted((tmp_path / "saved").glob("*/*.npz")))
    assert _values(again) == _values(report)
