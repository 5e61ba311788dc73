"""One task on one embedder: embed what the task needs, then score it (metrics and top-1 predictions).

Embedding and scoring are separate so that cached reference embeddings are scored exactly like fresh ones.
Any object with `embed_images`, `embed_texts` and `embed_composed` (and `embed_image_sets` for multi-image
tasks), returning float32 (N, D) unit vectors, can be evaluated: `pue.runtime.Embedder`,
`pue.export.ReferenceEmbedder`, or a test double.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pue.benchmarks.pmeb import metrics
from pue.benchmarks.pmeb.homie import homie_scores, pairwise_scores, record_layout
from pue.benchmarks.pmeb.tasks import (
    ClassificationData,
    ComposedData,
    MultiImageRetrievalData,
    MultipleChoiceData,
    RetrievalData,
    Task,
)
from pue.errors import PueError

CHUNK = 256  # items per embedder call: bounds memory (the reference loads a call's images at once) and shows progress


@dataclass
class TaskResult:
    """Metrics, top-1 predictions (gallery or class indices) and the embeddings they came from."""

    task: str
    meta_task: str
    metrics: dict[str, float]
    predictions: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray]
    metric_predictions: dict[str, str] = field(default_factory=dict)  # metric → the predictions it scores
    queries: dict[str, int] = field(default_factory=dict)  # predictions key → number of queries
    margins: dict[str, np.ndarray] = field(default_factory=dict)  # predictions key → top-1 minus top-2 score
    homie_names: dict[str, str] = field(default_factory=dict)  # metric → HOMIE's name, where it is HOMIE's metric


@dataclass(frozen=True)
class Request:
    """One batch of items of one kind to embed: images (paths), texts, both (composed), or sets of images."""

    kind: str  # "image", "text", "composed" or "image_set"
    images: list[str] | None = None
    texts: list[str] | None = None
    image_sets: list[list[str]] | None = None

    def __len__(self) -> int:
        if self.image_sets is not None:
            return len(self.image_sets)
        return len(self.images if self.images is not None else self.texts or [])


def embedding_requests(task: Task) -> dict[str, Request]:
    """What a task embeds, by name; these names key `TaskResult.embeddings` and the reference cache."""
    data = task.data
    path = lambda names: [str(task.image_path(n)) for n in names]  # noqa: E731
    if isinstance(data, MultiImageRetrievalData):
        return {
            "images": Request("image_set", image_sets=[path(names) for names in data.image_sets]),
            "captions": Request("text", texts=data.captions),
        }
    if isinstance(data, RetrievalData):
        return {"images": Request("image", images=path(data.images)), "captions": Request("text", texts=data.captions)}
    if isinstance(data, ClassificationData):
        return {"images": Request("image", images=path(data.images)), "prompts": Request("text", texts=data.prompts)}
    if isinstance(data, MultipleChoiceData):
        return {
            "queries": Request("composed", images=path(data.query_images), texts=data.questions),
            "options": Request("text", texts=data.distinct_options()),
        }
    assert isinstance(data, ComposedData)
    gallery = (
        Request("image", images=path(data.gallery))
        if data.gallery_kind == "image"
        else Request("text", texts=data.gallery)
    )
    return {"queries": Request("composed", images=path(data.query_images), texts=data.query_texts), "gallery": gallery}


def embed_task(
    task: Task, embedder: Any, progress: Callable[[str], None] | None = None, label: str = ""
) -> dict[str, np.ndarray]:
    """Embed every request of the task, in chunks of `CHUNK` items; checks shapes, finiteness and dimension."""
    out: dict[str, np.ndarray] = {}
    for name, request in embedding_requests(task).items():
        parts = []
        for start in range(0, len(request), CHUNK):
            stop = min(start + CHUNK, len(request))
            if request.kind == "image":
                parts.append(embedder.embed_images(request.images[start:stop]))
            elif request.kind == "text":
                parts.append(embedder.embed_texts(request.texts[start:stop]))
            elif request.kind == "image_set":
                parts.append(embedder.embed_image_sets(request.image_sets[start:stop]))
            else:
                parts.append(embedder.embed_composed(request.images[start:stop], request.texts[start:stop]))
            if progress is not None:
                progress(f"{label}{task.name}: {name} {stop}/{len(request)}")
        array = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
        _check_embeddings(task.name, name, array, len(request), out)
        out[name] = array
    return out


def score_task(
    task: Task,
    embeddings: dict[str, np.ndarray],
    records: tuple[np.ndarray, np.ndarray] | None = None,
    tie_order: str = "cuda",
) -> TaskResult:
    """pue's metrics from the distinct-item embeddings `embed_task` returned (or the cache held), then HOMIE's
    from `records` (record-level query and candidate embeddings, e.g. a saved HOMIE npz) or, without them, from
    the distinct ones expanded to records. `tie_order` is torch.topk's ("cuda" or "cpu", see topk.py)."""
    data = task.data
    if isinstance(data, RetrievalData):
        result = _score_retrieval(task, data, embeddings)
    elif isinstance(data, ClassificationData):
        result = _score_classification(task, data, embeddings)
        result.homie_names = {"accuracy": "accuracy", "balanced_accuracy": "balanced_accuracy"}  # same definitions
    elif isinstance(data, MultipleChoiceData):
        result = _score_multiple_choice(task, data, embeddings)
    else:
        result = _score_composed(task, data, embeddings)
    homie = homie_scores(task, *(records if records is not None else record_layout(task, embeddings)), tie_order)
    result.metrics.update(homie.metrics)
    result.homie_names.update(homie.homie_names)
    result.metric_predictions.update(homie.metric_predictions)
    result.predictions.update(homie.predictions)
    result.queries.update(homie.queries)
    result.margins.update(homie.margins)
    return result


def evaluate_task(
    task: Task, embedder: Any, progress: Callable[[str], None] | None = None, tie_order: str = "cuda"
) -> TaskResult:
    return score_task(task, embed_task(task, embedder, progress), tie_order=tie_order)


def disagreement_margins(result: TaskResult, reference: TaskResult) -> dict[str, dict[str, Any]]:
    """Per predictions key: how many items disagree with the reference, and how close to a tie the reference
    itself was on them (its top-1 minus top-2 score) next to its median margin over all items.

    A backend that flips only items the reference nearly tied is within its noise; one that flips items with
    wide reference margins is broken.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, predicted in result.predictions.items():
        margins = reference.margins.get(key)
        if margins is None:
            continue
        differ = np.asarray(predicted) != np.asarray(reference.predictions[key])
        finite = margins[np.isfinite(margins)]
        out[key] = {
            "disagreements": int(differ.sum()),
            "reference_margin_median": float(np.median(finite)) if finite.size else None,
            "reference_margin_max_disagreeing": float(margins[differ].max()) if differ.any() else None,
        }
    return out


def compare(result: TaskResult, reference: TaskResult) -> tuple[dict[str, float], float, dict[str, float]]:
    """(prediction agreement per predictions key, mean per-sample cosine over everything embedded, and per
    embedding name) of a backend's result against the reference's on the same task."""
    agreement = {
        key: metrics.agreement(result.predictions[key], reference.predictions[key]) for key in result.predictions
    }
    cosines = {
        name: metrics.cosine_rows(result.embeddings[name], reference.embeddings[name]) for name in result.embeddings
    }
    every = np.concatenate(list(cosines.values()))
    return agreement, float(every.mean()), {name: float(c.mean()) for name, c in cosines.items()}


# --- scoring per meta-task ----------------------------------------------------------------------------
def _score_retrieval(task: Task, data: RetrievalData, emb: dict[str, np.ndarray]) -> TaskResult:
    images, captions = emb["images"], emb["captions"]
    image_to_text = images @ captions.T
    text_to_image = image_to_text.T
    result = TaskResult(task.name, task.meta_task, {}, {}, emb)
    for direction, scores, relevant in (
        ("image_to_text", image_to_text, data.captions_of_image()),
        ("text_to_image", text_to_image, data.images_of_caption()),
    ):
        for k, value in _recalls(scores, relevant).items():
            metric = f"{direction}_recall@{k}"
            result.metrics[metric] = value
            result.metric_predictions[metric] = direction
        result.predictions[direction] = metrics.top1(scores)
        result.queries[direction] = scores.shape[0]
        result.margins[direction] = metrics.top2_margin(scores)
    return result


def _score_classification(task: Task, data: ClassificationData, emb: dict[str, np.ndarray]) -> TaskResult:
    prompts = emb["prompts"].astype(np.float64)
    owner = np.asarray(data.prompt_class)
    # A class's embedding: the mean over its synonyms × templates, renormalised (as HOMIE / CLIP-style ensembling).
    classes = np.stack([prompts[owner == c].mean(axis=0) for c in range(len(data.classes))])
    classes /= np.maximum(np.linalg.norm(classes, axis=1, keepdims=True), 1e-12)
    class_scores = emb["images"].astype(np.float64) @ classes.T
    predicted = metrics.top1(class_scores)
    truth = data.targets
    values = {
        "accuracy": metrics.accuracy(truth, predicted),
        "balanced_accuracy": metrics.balanced_accuracy(truth, predicted),
        "weighted_f1": metrics.weighted_f1(truth, predicted),
    }
    return TaskResult(
        task.name,
        task.meta_task,
        values,
        {"class": predicted},
        emb,
        {metric: "class" for metric in values},
        {"class": len(truth)},
        {"class": metrics.top2_margin(class_scores)},
    )


def _score_composed(task: Task, data: ComposedData, emb: dict[str, np.ndarray]) -> TaskResult:
    scores = emb["queries"] @ emb["gallery"].T
    values = {f"recall@{k}": v for k, v in _recalls(scores, [[t] for t in data.targets]).items()}
    result = TaskResult(
        task.name,
        task.meta_task,
        values,
        {"target": metrics.top1(scores)},
        emb,
        {metric: "target" for metric in values},
        {"target": scores.shape[0]},
        {"target": metrics.top2_margin(scores)},
    )
    if data.form == "question":  # the other direction, HOMIE's: each distinct answer retrieves its distinct queries
        column_of: dict[tuple[str, str], int] = {}  # distinct (image, question) → its column
        rows: list[int] = []  # column → its first record
        answers: list[dict[int, None]] = [{} for _ in data.gallery]  # answer → the columns it answers
        for record, key in enumerate(zip(data.query_images, data.query_texts, strict=True)):
            if key not in column_of:
                column_of[key] = len(rows)
                rows.append(record)
            answers[data.targets[record]][column_of[key]] = None
        backward = emb["gallery"] @ emb["queries"][rows].T
        relevant = [list(columns) for columns in answers]
        for k, value in _recalls(backward, relevant).items():
            result.metrics[f"answer_to_query_recall@{k}"] = value
            result.metric_predictions[f"answer_to_query_recall@{k}"] = "answer_to_query"
        result.predictions["answer_to_query"] = metrics.top1(backward)
        result.queries["answer_to_query"] = backward.shape[0]
        result.margins["answer_to_query"] = metrics.top2_margin(backward)
    return result


def _score_multiple_choice(task: Task, data: MultipleChoiceData, emb: dict[str, np.ndarray]) -> TaskResult:
    """A record is right when its answer's option scores strictly above every other option (ties count against,
    as in pue's recall); the prediction is the best option, the first of equal ones."""
    index = {text: i for i, text in enumerate(data.distinct_options())}
    scores = pairwise_scores(emb["queries"], emb["options"])
    right, predicted, margins = [], [], []
    for record, options in enumerate(data.options):
        own = scores[record, [index[text] for text in options]]
        correct = np.zeros(len(options), dtype=bool)
        correct[data.correct(record)] = True
        right.append(own[correct].max() > own[~correct].max() if (~correct).any() else True)
        predicted.append(int(own.argmax()))
        margins.append(metrics.top2_margin(own[None, :])[0])
    return TaskResult(
        task.name,
        task.meta_task,
        {"accuracy": float(np.mean(right))},
        {"option": np.array(predicted)},
        emb,
        {"accuracy": "option"},
        {"option": len(predicted)},
        {"option": np.array(margins)},
    )


def _recalls(scores: np.ndarray, relevant: list[list[int]]) -> dict[int, float]:
    """Recall@1/5/10, leaving out every k that is not below the gallery size (such a recall is 1 by definition)."""
    ks = [k for k in metrics.DEFAULT_KS if k < scores.shape[1]] or [1]
    return metrics.recall_at_k(scores, relevant, ks)


def _check_embeddings(task: str, name: str, array: np.ndarray, count: int, done: dict[str, np.ndarray]) -> None:
    if array.ndim != 2 or array.shape[0] != count:
        raise PueError(
            f"task {task}: the embedder returned shape {array.shape} for {count} {name}", "expected (items, dimension)"
        )
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise PueError(
            f"task {task}: {len(bad)} of the {name} embeddings hold NaN or inf (first: item {bad[0]})",
            "the backend or bundle is broken; check it with pue-export inspect",
        )
    for other, previous in done.items():
        if previous.shape[1] != array.shape[1]:
            raise PueError(
                f"task {task}: {name} embeddings have dimension {array.shape[1]}, {other} {previous.shape[1]}"
            )
