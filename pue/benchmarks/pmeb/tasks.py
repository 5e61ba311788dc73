"""PMEB task folders: `task.json` plus the data files, in the formats the MLLM4PUE / HOMIE evaluation code reads.

One folder per task. `task.json` holds `name` (default: the folder's name), `meta_task`, the data files and an
optional `image_root` (relative to the task folder; default the folder itself):

* `retrieval`: `"data"`: a JSON list (or JSONL) of `{"img": ..., "caption": ...}`.
* `classification`: `"labels"`: a CSV with columns `image_name,label`; `"prompts"`: a JSON
  `{set_name: {"classnames": {label: [synonyms]}, "templates": ["... CLASSNAME ..."]}}` (optional
  `"prompt_set"` picks the set when the file holds several).
* `composed_retrieval`: `"data"`: a JSON list (or JSONL) of `{"source_image", "modifier", "target_image"}`
  (or `"target_text"`), or of `{"image", "question", "answer"}` (`"key_finding_text"` accepted for
  `"answer"`, as in PathVQA's files).
* `multiple_choice`: `"data"`: a JSON list (or JSONL) of PathMMU-style `{"No", "img", "question", "options",
  "answer"}`; `options` a list of texts (records may have different numbers), `answer` the text of one of them.
* `multi_image_retrieval`: `"data"`: a JSON list (or JSONL) of HOMIE's multi-image records `{"img": [name, ...],
  "caption": ...}`: the images of a record, in order, are embedded as one query (`Embedder.embed_image_sets`) and
  scored like `retrieval` (set ↔ caption).

Everything is checked at load, before any model runs: a problem raises `TaskError` naming the file (and the
item or line), what was expected and what to do. See docs/pmeb.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pue.benchmarks.pmeb.files import (
    MissingImagesError,
    TaskError,
    data_file,
    field_text,
    listing,
    read_csv,
    read_json,
    read_records,
)

META_TASKS = ("retrieval", "classification", "composed_retrieval", "multiple_choice", "multi_image_retrieval")
TASK_FILE = "task.json"
CLASSNAME = "CLASSNAME"
_COMMON_KEYS = {"name", "meta_task", "image_root", "description"}
_KEYS = {
    "retrieval": {"data"},
    "classification": {"labels", "prompts", "prompt_set"},
    "composed_retrieval": {"data"},
    "multiple_choice": {"data"},
    "multi_image_retrieval": {"data"},
}


@dataclass
class RetrievalData:
    """Distinct images and captions (in order of first appearance) and the (image, caption) pairs that match;
    `records` keeps every record of the file, in order, duplicates included (HOMIE scores records)."""

    images: list[str]
    captions: list[str]
    pairs: list[tuple[int, int]]
    records: list[tuple[int, int]] = field(default_factory=list)

    def captions_of_image(self) -> list[list[int]]:
        found: list[list[int]] = [[] for _ in self.images]
        for image, caption in self.pairs:
            found[image].append(caption)
        return found

    def images_of_caption(self) -> list[list[int]]:
        found: list[list[int]] = [[] for _ in self.captions]
        for image, caption in self.pairs:
            found[caption].append(image)
        return found


@dataclass
class MultiImageRetrievalData(RetrievalData):
    """Retrieval whose "images" are sets of images: `images` holds one key per distinct set (its names joined by
    " | ") and `image_sets[i]` the names of set i, in order; pairs and records index the sets."""

    image_sets: list[list[str]] = field(default_factory=list)


@dataclass
class ClassificationData:
    """One image per CSV row with its label; every class's prompts (synonyms × templates), in prompt-file order."""

    images: list[str]
    labels: list[str]
    classes: list[str]
    prompts: list[str]
    prompt_class: list[int]

    @property
    def targets(self) -> list[int]:
        index = {label: i for i, label in enumerate(self.classes)}
        return [index[label] for label in self.labels]


@dataclass
class ComposedData:
    """Queries (image + text) and a gallery of distinct targets (images or texts); `targets[q]` indexes it."""

    query_images: list[str]
    query_texts: list[str]
    gallery: list[str]
    gallery_kind: str  # "image" or "text"
    targets: list[int]
    form: str  # "modifier" ({source_image, modifier, target_*}) or "question" ({image, question, answer})


@dataclass
class MultipleChoiceData:
    """One query (image + question) per record with its own options; `answers[r]` indexes `options[r]`."""

    query_images: list[str]
    questions: list[str]
    options: list[list[str]]
    answers: list[int]

    def distinct_options(self) -> list[str]:
        """Every option text once, in order of first appearance (what is embedded)."""
        return list(dict.fromkeys(text for record in self.options for text in record))

    def correct(self, record: int) -> list[int]:
        """The record's options whose text is its answer (HOMIE: `options[prediction] == answer`)."""
        answer = self.options[record][self.answers[record]]
        return [i for i, text in enumerate(self.options[record]) if text == answer]


TaskData = RetrievalData | MultiImageRetrievalData | ClassificationData | ComposedData | MultipleChoiceData


@dataclass
class Task:
    name: str
    meta_task: str
    folder: Path
    image_root: Path
    data: TaskData
    files: list[Path] = field(default_factory=list)  # task.json and its data files (hashed for the cache)
    description: str = ""

    def image_names(self) -> list[str]:
        """Every distinct image the task reads, relative to `image_root`."""
        data = self.data
        if isinstance(data, ComposedData):
            names = list(data.query_images) + (data.gallery if data.gallery_kind == "image" else [])
        elif isinstance(data, MultipleChoiceData):
            names = list(data.query_images)
        elif isinstance(data, MultiImageRetrievalData):
            names = [name for names in data.image_sets for name in names]
        else:
            names = list(data.images)
        return list(dict.fromkeys(names))

    def image_path(self, name: str) -> Path:
        return self.image_root / name

    @property
    def size(self) -> int:
        """Queries (retrieval: pairs), for reports."""
        data = self.data
        if isinstance(data, RetrievalData):
            return len(data.pairs)
        if isinstance(data, ClassificationData):
            return len(data.images)
        return len(data.query_images)

    @property
    def form(self) -> str:
        """`meta_task`, or for composed retrieval `composed_question` / `composed_modifier` (they score apart)."""
        data = self.data
        return f"composed_{data.form}" if isinstance(data, ComposedData) else self.meta_task


def load_task(folder: Path) -> Task:
    """Read and check one task folder (see the module docstring for the layout)."""
    folder = Path(folder)
    spec_path = folder / TASK_FILE
    if not folder.is_dir():
        raise TaskError(folder, "is not a task folder (it does not exist or is not a directory)")
    if not spec_path.is_file():
        raise TaskError(
            folder, f"has no {TASK_FILE}", "a task folder holds task.json and its data files (docs/pmeb.md)"
        )
    spec = read_json(spec_path)
    if not isinstance(spec, dict):
        raise TaskError(spec_path, f"must hold a JSON object, found {type(spec).__name__}")
    meta_task = spec.get("meta_task")
    if meta_task not in META_TASKS:
        raise TaskError(spec_path, f"unknown meta_task {meta_task!r}", f"use one of: {', '.join(META_TASKS)}")
    unknown = sorted(set(spec) - _COMMON_KEYS - _KEYS[meta_task])
    if unknown:
        allowed = ", ".join(sorted(_COMMON_KEYS | _KEYS[meta_task]))
        raise TaskError(spec_path, f"unknown key(s) {', '.join(unknown)} for a {meta_task} task", f"allowed: {allowed}")
    name = spec.get("name", folder.name)
    if not isinstance(name, str) or not name.strip():
        raise TaskError(spec_path, f"'name' must be a non-empty string, found {name!r}")
    image_root = (folder / str(spec.get("image_root", "."))).resolve()
    if not image_root.is_dir():
        raise TaskError(
            spec_path,
            f"image_root {spec.get('image_root')!r} resolves to {image_root}, not a folder",
            "image_root is relative to the task folder",
        )
    files = [spec_path]
    if meta_task == "retrieval":
        data_path = data_file(folder, spec, "data", spec_path)
        data: TaskData = _read_retrieval(data_path)
        files.append(data_path)
    elif meta_task == "classification":
        labels_path = data_file(folder, spec, "labels", spec_path)
        prompts_path = data_file(folder, spec, "prompts", spec_path)
        data = _read_classification(labels_path, prompts_path, spec.get("prompt_set"))
        files += [labels_path, prompts_path]
    elif meta_task == "multiple_choice":
        data_path = data_file(folder, spec, "data", spec_path)
        data = _read_multiple_choice(data_path)
        files.append(data_path)
    elif meta_task == "multi_image_retrieval":
        data_path = data_file(folder, spec, "data", spec_path)
        data = _read_multi_image_retrieval(data_path)
        files.append(data_path)
    else:
        data_path = data_file(folder, spec, "data", spec_path)
        data = _read_composed(data_path)
        files.append(data_path)
    task = Task(
        name=name,
        meta_task=meta_task,
        folder=folder,
        image_root=image_root,
        data=data,
        files=files,
        description=str(spec.get("description", "")),
    )
    names = task.image_names()
    missing = [n for n in names if not task.image_path(n).is_file()]
    if missing:
        raise MissingImagesError(files[1], missing, len(names), image_root)
    return task


def discover_tasks(data_dir: Path, names: list[str] | None = None) -> list[Task]:
    """Every task folder under `data_dir` (sorted by folder name), or `data_dir` itself if it holds task.json.

    `names` selects tasks by their `name` or folder name, in the order given; an unknown name is an error
    listing the known ones.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise TaskError(root, "PMEB data folder does not exist", "pass --data DIR, a folder of task folders")
    if (root / TASK_FILE).is_file():
        folders = [root]
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / TASK_FILE).is_file())
    if not folders:
        raise TaskError(
            root,
            f"holds no task folders (sub-folders with a {TASK_FILE})",
            "see docs/pmeb.md for the layout, or try the shipped pmeb-mini",
        )
    tasks = [load_task(folder) for folder in folders]
    seen: dict[str, Path] = {}
    for task in tasks:
        if task.name in seen:
            raise TaskError(
                root,
                f"two task folders are both named {task.name!r}: {seen[task.name]} and {task.folder}",
                "give each task.json its own name",
            )
        seen[task.name] = task.folder
    if names is None:
        return tasks
    by_name = {t.folder.name: t for t in tasks} | {t.name: t for t in tasks}  # a task's own name wins
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise TaskError(
            root, f"no task named {', '.join(map(repr, unknown))}", f"tasks found: {', '.join(t.name for t in tasks)}"
        )
    return list({id(by_name[n]): by_name[n] for n in names}.values())


# --- formats --------------------------------------------------------------------------------------------
def _read_retrieval(path: Path) -> RetrievalData:
    records = read_records(path)
    images: dict[str, int] = {}
    captions: dict[str, int] = {}
    pairs: dict[tuple[int, int], None] = {}
    in_order = []
    for where, record in records:
        image = field_text(record, ("img", "image"), path, where)
        caption = field_text(record, ("caption", "text"), path, where)
        pair = (images.setdefault(image, len(images)), captions.setdefault(caption, len(captions)))
        pairs[pair] = None
        in_order.append(pair)
    return RetrievalData(images=list(images), captions=list(captions), pairs=list(pairs), records=in_order)


def _read_multi_image_retrieval(path: Path) -> MultiImageRetrievalData:
    records = read_records(path)
    sets: dict[tuple[str, ...], int] = {}
    captions: dict[str, int] = {}
    pairs: dict[tuple[int, int], None] = {}
    in_order = []
    for where, record in records:
        key = next((k for k in ("img", "images") if k in record), None)
        names = record.get(key) if key is not None else None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise TaskError(
                path,
                f"{where}: {key or 'img'!r} must be a non-empty list of image names, found {names!r}",
                'a multi-image record is {"img": ["a.png", "b.png"], "caption": "..."}',
            )
        caption = field_text(record, ("caption", "text"), path, where)
        pair = (sets.setdefault(tuple(names), len(sets)), captions.setdefault(caption, len(captions)))
        pairs[pair] = None
        in_order.append(pair)
    return MultiImageRetrievalData(
        images=[" | ".join(names) for names in sets],
        captions=list(captions),
        pairs=list(pairs),
        records=in_order,
        image_sets=[list(names) for names in sets],
    )


def _read_multiple_choice(path: Path) -> MultipleChoiceData:
    images, questions, options, answers = [], [], [], []
    for where, record in read_records(path):
        images.append(field_text(record, ("img", "image"), path, where))
        questions.append(field_text(record, ("question",), path, where))
        choices = record.get("options")
        if not isinstance(choices, list) or len(choices) < 2:
            raise TaskError(path, f"{where}: 'options' must be a list of at least 2 texts, found {choices!r}")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise TaskError(path, f"{where}: every option must be a non-empty string, found {choices!r}")
        answer = field_text(record, ("answer",), path, where)
        if answer not in choices:
            raise TaskError(
                path,
                f"{where}: answer {answer!r} is not one of its options {choices!r}",
                "the answer is the text of the correct option (a letter like 'B' is not resolved)",
            )
        options.append(list(choices))
        answers.append(choices.index(answer))
    return MultipleChoiceData(query_images=images, questions=questions, options=options, answers=answers)


def _read_composed(path: Path) -> ComposedData:
    records = read_records(path)
    forms = {"question" if "question" in record else "modifier" for _, record in records}
    if len(forms) > 1:
        raise TaskError(
            path,
            "mixes {image, question, answer} records with {source_image, modifier, target_*} ones",
            "put each form in its own task",
        )
    form = forms.pop()
    query_images, query_texts, target_names, kinds = [], [], [], set()
    for where, record in records:
        if form == "question":
            query_images.append(field_text(record, ("image", "img"), path, where))
            query_texts.append(field_text(record, ("question",), path, where))
            target_names.append(field_text(record, ("answer", "key_finding_text"), path, where))
            kinds.add("text")
        else:
            query_images.append(field_text(record, ("source_image",), path, where))
            query_texts.append(field_text(record, ("modifier",), path, where))
            kind = "image" if "target_image" in record else "text"
            target_names.append(field_text(record, ("target_image", "target_text"), path, where))
            kinds.add(kind)
    if len(kinds) > 1:
        raise TaskError(path, "mixes target_image and target_text records", "one gallery kind per task")
    gallery = list(dict.fromkeys(target_names))
    index = {name: i for i, name in enumerate(gallery)}
    return ComposedData(
        query_images=query_images,
        query_texts=query_texts,
        gallery=gallery,
        gallery_kind=kinds.pop(),
        targets=[index[n] for n in target_names],
        form=form,
    )


def _read_classification(labels_path: Path, prompts_path: Path, prompt_set: Any) -> ClassificationData:
    images, labels = [], []
    for line, row in read_csv(labels_path, ("image_name", "label")):
        image, label = (row.get("image_name") or "").strip(), (row.get("label") or "").strip()
        if not image or not label:
            raise TaskError(labels_path, f"line {line} has an empty image_name or label")
        images.append(image)
        labels.append(label)
    classnames, templates = _read_prompts(prompts_path, prompt_set)
    missing = sorted(set(labels) - set(classnames))
    if missing:
        raise TaskError(
            labels_path,
            f"label(s) without prompts in {prompts_path.name}: {listing(missing)}",
            f"add them to 'classnames' (known: {listing(list(classnames))})",
        )
    classes, prompts, prompt_class = [], [], []
    for class_index, (label, synonyms) in enumerate(classnames.items()):
        classes.append(label)
        for synonym in synonyms:
            for template in templates:
                prompts.append(template.replace(CLASSNAME, synonym))
                prompt_class.append(class_index)
    return ClassificationData(images=images, labels=labels, classes=classes, prompts=prompts, prompt_class=prompt_class)


def _read_prompts(path: Path, prompt_set: Any) -> tuple[dict[str, list[str]], list[str]]:
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise TaskError(path, "must hold {set_name: {classnames: {label: [synonyms]}, templates: [...]}}")
    if prompt_set is None:
        if len(data) > 1:
            raise TaskError(
                path, f"holds several prompt sets ({', '.join(data)})", 'pick one with "prompt_set" in task.json'
            )
        prompt_set = next(iter(data))
    if prompt_set not in data:
        raise TaskError(path, f"has no prompt set {prompt_set!r}", f"sets: {', '.join(data)}")
    entry = data[prompt_set]
    classnames = entry.get("classnames") if isinstance(entry, dict) else None
    templates = entry.get("templates") if isinstance(entry, dict) else None
    if not isinstance(classnames, dict) or not classnames:
        raise TaskError(path, f"prompt set {prompt_set!r} needs a non-empty 'classnames' object {{label: [synonyms]}}")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise TaskError(path, f"prompt set {prompt_set!r} needs a non-empty 'templates' list of strings")
    without = [t for t in templates if CLASSNAME not in t]
    if without:
        raise TaskError(
            path,
            f"template(s) without the {CLASSNAME} placeholder: {listing(without)}",
            f"every template names the class as {CLASSNAME}",
        )
    cleaned: dict[str, list[str]] = {}
    for label, synonyms in classnames.items():
        if isinstance(synonyms, str):
            synonyms = [synonyms]
        if not isinstance(synonyms, list) or not synonyms or not all(isinstance(s, str) and s for s in synonyms):
            raise TaskError(path, f"class {label!r} needs a non-empty list of synonyms (strings)")
        cleaned[str(label).strip()] = synonyms
    return cleaned, templates
