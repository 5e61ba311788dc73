"""HOMIE's PMEB metrics, computed HOMIE's way (`qfchou/HOMIE`, `eval/eval_zeroshot/eval_path.py`).

HOMIE embeds one query and one candidate per *record* (duplicates included) and scores the pairs on the
diagonal: record r's query matches record r's candidate and nothing else, so a duplicated caption or a repeated
answer is a negative. A record is a hit at k when its positive is among the indices `torch.topk` returns, which
settles ties (see `pue.benchmarks.pmeb.topk`). pue embeds each distinct item once; `record_layout` expands those
embeddings into HOMIE's record-level query / candidate matrices (its `--embeddings_output` layout), and
`distinct_embeddings` goes back (first occurrence of each item).

HOMIE's task for each pue form, its query and candidate rows, and its metrics:

* retrieval → `retrieval`: image per record, caption per record; `image_retrieval_recall@k` (caption → image)
  and `text_retrieval_recall@k` (image → caption).
* classification → `zeroshot`: image per CSV row, prompt per class × synonym × template; `accuracy` and
  `balanced_accuracy` (the same definitions as pue's, so pue's rows carry those names).
* composed, question form → `vqa`: image + question per record, answer per record; `query_retrieval_recall@k`
  (each answer retrieves its own query).
* composed, modifier form → `composedretrieval`: source + modifier per record, the distinct targets sorted by
  name; `query_retrieval_recall@k` (query → target).
* multiple choice → `mcq`: image + question per record, every option of every record in order; `accuracy`.
* multi-image retrieval → scored as `retrieval`, the query of a record being its set of images embedded as one
  vector (`multi_image_retrieval` is pue's name for the saved-embeddings task kind).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pue.benchmarks.pmeb import metrics
from pue.benchmarks.pmeb.tasks import ClassificationData, ComposedData, MultipleChoiceData, RetrievalData, Task
from pue.benchmarks.pmeb.topk import top1 as topk_top1
from pue.benchmarks.pmeb.topk import topk_hits

HOMIE_TASKS = {
    "retrieval": "retrieval",
    "classification": "zeroshot",
    "composed_question": "vqa",
    "composed_modifier": "composedretrieval",
    "multiple_choice": "mcq",
    "multi_image_retrieval": "multi_image_retrieval",  # pue's name: scored as HOMIE scores retrieval, per record
}


@dataclass
class HomieScores:
    """HOMIE-way metrics (pue metric name → value), their HOMIE names, and top-1 predictions per direction."""

    metrics: dict[str, float] = field(default_factory=dict)
    homie_names: dict[str, str] = field(default_factory=dict)
    metric_predictions: dict[str, str] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    queries: dict[str, int] = field(default_factory=dict)
    margins: dict[str, np.ndarray] = field(default_factory=dict)


def record_indices(task: Task) -> dict[str, tuple[str, np.ndarray]]:
    """For "query" and "candidate": (the embeddings key pue stores, the distinct row of each HOMIE row)."""
    data = task.data
    if isinstance(data, RetrievalData):
        images, captions = zip(*data.records, strict=True)
        return {"query": ("images", np.array(images)), "candidate": ("captions", np.array(captions))}
    if isinstance(data, ClassificationData):
        return {
            "query": ("images", np.arange(len(data.images))),
            "candidate": ("prompts", np.arange(len(data.prompts))),
        }
    if isinstance(data, MultipleChoiceData):
        index = {text: i for i, text in enumerate(data.distinct_options())}
        flat = [index[text] for record in data.options for text in record]
        return {"query": ("queries", np.arange(len(data.query_images))), "candidate": ("options", np.array(flat))}
    assert isinstance(data, ComposedData)
    queries = ("queries", np.arange(len(data.query_images)))
    if data.form == "question":
        return {"query": queries, "candidate": ("gallery", np.asarray(data.targets))}
    return {"query": queries, "candidate": ("gallery", np.asarray(sorted_gallery(data)))}


def sorted_gallery(data: ComposedData) -> list[int]:
    """Gallery indices in HOMIE's candidate order: the distinct targets sorted by name."""
    return sorted(range(len(data.gallery)), key=data.gallery.__getitem__)


def record_layout(task: Task, embeddings: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(query, candidate) embeddings, one row per HOMIE record, from pue's distinct-item embeddings."""
    layout = record_indices(task)
    query_key, query_index = layout["query"]
    candidate_key, candidate_index = layout["candidate"]
    return embeddings[query_key][query_index], embeddings[candidate_key][candidate_index]


def distinct_embeddings(task: Task, query: np.ndarray, candidate: np.ndarray) -> dict[str, np.ndarray]:
    """pue's distinct-item embeddings from HOMIE's record-level rows: each item's first occurrence."""
    out = {}
    for rows, (key, index) in ((query, record_indices(task)["query"]), (candidate, record_indices(task)["candidate"])):
        values, first = np.unique(index, return_index=True)
        assert np.array_equal(values, np.arange(len(values))), "every distinct item appears in some record"
        out[key] = np.ascontiguousarray(rows[first])
    return out


def pairwise_scores(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """rows @ columns.T in float32, computed once per distinct vector: equal vectors get bit-equal scores, so a
    duplicated item ties exactly (a BLAS kernel may round the same dot product differently at a tile edge)."""
    unique_rows, row_of = np.unique(np.asarray(rows, np.float32), axis=0, return_inverse=True)
    unique_columns, column_of = np.unique(np.asarray(columns, np.float32), axis=0, return_inverse=True)
    scores = unique_rows @ unique_columns.T
    return scores[row_of.reshape(-1)][:, column_of.reshape(-1)]


def homie_scores(task: Task, query: np.ndarray, candidate: np.ndarray, tie_order: str = "cuda") -> HomieScores:
    """HOMIE's metrics on record-level embeddings (see the module docstring); zero-shot's are pue's own rows."""
    data = task.data
    out = HomieScores()
    if isinstance(data, RetrievalData):
        scores = pairwise_scores(candidate, query)  # HOMIE: text_features @ image_features.t()
        diagonal = np.arange(len(scores))
        _recalls(out, "homie_text_to_image", "image_retrieval_recall", scores, diagonal, tie_order)
        _recalls(out, "homie_image_to_text", "text_retrieval_recall", scores.T, diagonal, tie_order)
    elif isinstance(data, ComposedData) and data.form == "question":
        scores = pairwise_scores(candidate, query)  # each answer retrieves its own query
        _recalls(out, "homie_answer_to_query", "query_retrieval_recall", scores, np.arange(len(scores)), tie_order)
    elif isinstance(data, ComposedData):
        position = {g: p for p, g in enumerate(sorted_gallery(data))}
        positives = np.array([position[t] for t in data.targets])
        _recalls(
            out,
            "homie_query_to_target",
            "query_retrieval_recall",
            pairwise_scores(query, candidate),
            positives,
            tie_order,
            name="homie_recall",
        )
    elif isinstance(data, MultipleChoiceData):
        predicted, correct = [], []
        start = 0
        for record, options in enumerate(data.options):  # HOMIE slices idx * len(options): right only if all equal
            scores = pairwise_scores(query[record : record + 1], candidate[start : start + len(options)])[0]
            start += len(options)
            choice = int(scores.argmax())  # torch.argmax: the first of equal maxima
            predicted.append(choice)
            correct.append(options[choice] == options[data.answers[record]])
        out.metrics["homie_accuracy"] = float(np.mean(correct))
        out.homie_names["homie_accuracy"] = "accuracy"
        out.metric_predictions["homie_accuracy"] = "homie_option"
        out.predictions["homie_option"] = np.array(predicted)
        out.queries["homie_option"] = len(predicted)
    return out


def _recalls(
    out: HomieScores,
    key: str,
    homie: str,
    scores: np.ndarray,
    positives: np.ndarray,
    tie_order: str,
    name: str | None = None,
) -> None:
    ks = [k for k in metrics.DEFAULT_KS if k < scores.shape[1]] or [1]
    for k in ks:
        metric = f"{name or key + '_recall'}@{k}"
        out.metrics[metric] = float(np.mean(topk_hits(scores, positives, k, tie_order)))
        out.homie_names[metric] = f"{homie}@{k}"
        out.metric_predictions[metric] = key
    out.predictions[key] = topk_top1(scores, tie_order)
    out.queries[key] = scores.shape[0]
    out.margins[key] = metrics.top2_margin(scores)
