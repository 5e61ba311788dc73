"""PMEB task folders: every format HOMIE's evaluation reads, JSONL, galleries, pmeb-mini, converters, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pue.benchmarks.pmeb import MissingImagesError, TaskError, discover_tasks, load_task, pmeb_mini_dir
from pue.benchmarks.pmeb.convert import captions_to_retrieval, folders_to_classification, main
from pue.benchmarks.pmeb.mini import build_pmeb_mini
from pue.benchmarks.pmeb.tasks import ClassificationData, ComposedData, MultiImageRetrievalData, RetrievalData
from pue.errors import OutputExistsError, PueError


def images(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 100, 150)).save(path)


def task_folder(root: Path, spec: dict, files: dict[str, str | list | dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.json").write_text(json.dumps(spec))
    for name, content in files.items():
        (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root


PROMPTS = {
    "demo": {
        "classnames": {"tumor": ["tumor", "carcinoma"], "normal": ["normal tissue"]},
        "templates": ["an image of CLASSNAME.", "CLASSNAME"],
    }
}


def classification(
    tmp_path: Path,
    labels: str = "image_name,label\na.png,tumor\nb.png,normal\nc.png,tumor\n",
    prompts: dict = PROMPTS,
    **spec,
) -> Path:
    images(tmp_path / "t", "a.png", "b.png", "c.png")
    return task_folder(
        tmp_path / "t",
        {"name": "demo", "meta_task": "classification", "labels": "labels.csv", "prompts": "prompts.json", **spec},
        {"labels.csv": labels, "prompts.json": prompts},
    )


# --- formats ------------------------------------------------------------------------------------------
def test_retrieval_json_with_duplicates(tmp_path):
    images(tmp_path / "imgs", "a.png", "b.png")
    pairs = [
        {"img": "a.png", "caption": "x"},
        {"img": "b.png", "caption": "x"},
        {"img": "a.png", "caption": "y"},
        {"img": "a.png", "caption": "y"},
    ]
    task = load_task(
        task_folder(
            tmp_path / "t",
            {"name": "r", "meta_task": "retrieval", "data": "pairs.json", "image_root": "../imgs"},
            {"pairs.json": pairs},
        )
    )
    data = task.data
    assert isinstance(data, RetrievalData)
    assert (data.images, data.captions, data.pairs) == (["a.png", "b.png"], ["x", "y"], [(0, 0), (1, 0), (0, 1)])
    assert data.captions_of_image() == [[0, 1], [0]]
    assert data.images_of_caption() == [[0, 1], [0]]
    assert task.image_root == (tmp_path / "imgs").resolve()
    assert task.image_names() == ["a.png", "b.png"]


def test_retrieval_jsonl(tmp_path):
    images(tmp_path / "t", "a.png", "b.png")
    lines = '{"img": "a.png", "caption": "x"}\n\n{"img": "b.png", "caption": "z"}\n'
    task = load_task(
        task_folder(tmp_path / "t", {"meta_task": "retrieval", "data": "pairs.jsonl"}, {"pairs.jsonl": lines})
    )
    assert task.name == "t"  # the folder's name when task.json names none
    assert task.data.captions == ["x", "z"]


def test_multi_image_retrieval_records(tmp_path):
    """HOMIE's multi-image records: the images of a record, in order, are one query; a repeated set is one item."""
    images(tmp_path / "t", "a.png", "b.png", "c.png", "d.png")
    records = [
        {"img": ["a.png", "b.png"], "caption": "x"},
        {"img": ["a.png", "b.png", "c.png", "d.png"], "caption": "y"},
        {"img": ["b.png", "a.png"], "caption": "x"},  # another order is another query
        {"img": ["a.png", "b.png"], "caption": "z"},
    ]
    spec = {"meta_task": "multi_image_retrieval", "data": "data.json"}
    task = load_task(task_folder(tmp_path / "t", spec, {"data.json": records}))
    data = task.data
    assert isinstance(data, MultiImageRetrievalData) and isinstance(data, RetrievalData)
    assert data.image_sets == [["a.png", "b.png"], ["a.png", "b.png", "c.png", "d.png"], ["b.png", "a.png"]]
    assert data.images == ["a.png | b.png", "a.png | b.png | c.png | d.png", "b.png | a.png"]
    assert data.captions == ["x", "y", "z"] and data.pairs == [(0, 0), (1, 1), (2, 0), (0, 2)]
    assert data.records == data.pairs and task.size == 4
    assert task.image_names() == ["a.png", "b.png", "c.png", "d.png"]


@pytest.mark.parametrize("img", [[], "a.png", ["a.png", ""], [1, 2]])
def test_multi_image_records_need_a_list_of_names(tmp_path, img):
    images(tmp_path / "t", "a.png")
    spec = {"meta_task": "multi_image_retrieval", "data": "data.json"}
    folder = task_folder(tmp_path / "t", spec, {"data.json": [{"img": img, "caption": "x"}]})
    with pytest.raises(TaskError, match="must be a non-empty list of image names"):
        load_task(folder)


def test_multi_image_task_names_its_missing_images(tmp_path):
    images(tmp_path / "t", "a.png")
    spec = {"meta_task": "multi_image_retrieval", "data": "data.json"}
    folder = task_folder(tmp_path / "t", spec, {"data.json": [{"img": ["a.png", "gone.png"], "caption": "x"}]})
    with pytest.raises(MissingImagesError, match="gone.png"):
        load_task(folder)


def test_classification_prompts_are_synonyms_times_templates(tmp_path):
    task = load_task(classification(tmp_path))
    data = task.data
    assert isinstance(data, ClassificationData)
    assert data.classes == ["tumor", "normal"]
    assert data.prompts == [
        "an image of tumor.",
        "tumor",
        "an image of carcinoma.",
        "carcinoma",
        "an image of normal tissue.",
        "normal tissue",
    ]
    assert data.prompt_class == [0, 0, 0, 0, 1, 1]
    assert data.targets == [0, 1, 0]


def test_composed_with_target_images(tmp_path):
    images(tmp_path / "t", "s1.png", "s2.png", "t1.png", "t2.png")
    records = [
        {"source_image": "s1.png", "modifier": "more nuclei", "target_image": "t2.png"},
        {"source_image": "s2.png", "modifier": "less stroma", "target_image": "t1.png"},
        {"source_image": "s1.png", "modifier": "again", "target_image": "t2.png"},
    ]
    task = load_task(
        task_folder(tmp_path / "t", {"meta_task": "composed_retrieval", "data": "q.json"}, {"q.json": records})
    )
    data = task.data
    assert isinstance(data, ComposedData)
    assert (data.gallery, data.gallery_kind, data.targets, data.form) == (
        ["t2.png", "t1.png"],
        "image",
        [0, 1, 0],
        "modifier",
    )
    assert sorted(task.image_names()) == ["s1.png", "s2.png", "t1.png", "t2.png"]


def test_composed_with_target_texts(tmp_path):
    images(tmp_path / "t", "s1.png")
    records = [{"source_image": "s1.png", "modifier": "as IHC", "target_text": "brown DAB"}]
    data = load_task(
        task_folder(tmp_path / "t", {"meta_task": "composed_retrieval", "data": "q.json"}, {"q.json": records})
    ).data
    assert (data.gallery, data.gallery_kind) == (["brown DAB"], "text")


@pytest.mark.parametrize("answer_key", ["answer", "key_finding_text"])
def test_question_answer_form(tmp_path, answer_key):
    images(tmp_path / "t", "a.png", "b.png")
    records = [
        {"image": "a.png", "question": "stain?", answer_key: "H&E"},
        {"image": "b.png", "question": "stain?", answer_key: "IHC"},
        {"image": "b.png", "question": "tissue?", answer_key: "H&E"},
    ]
    data = load_task(
        task_folder(tmp_path / "t", {"meta_task": "composed_retrieval", "data": "vqa.json"}, {"vqa.json": records})
    ).data
    assert (data.query_images, data.query_texts) == (["a.png", "b.png", "b.png"], ["stain?", "stain?", "tissue?"])
    assert (data.gallery, data.gallery_kind, data.targets, data.form) == (["H&E", "IHC"], "text", [0, 1, 0], "question")


def test_prompt_set_choice(tmp_path):
    two = {**PROMPTS, "other": PROMPTS["demo"]}
    with pytest.raises(TaskError, match="several prompt sets"):
        load_task(classification(tmp_path, prompts=two))
    assert load_task(classification(tmp_path, prompts=two, prompt_set="other")).data.classes == ["tumor", "normal"]


# --- bad input ----------------------------------------------------------------------------------------
def test_missing_task_json_and_data_files(tmp_path):
    (tmp_path / "t").mkdir()
    with pytest.raises(TaskError, match="has no task.json"):
        load_task(tmp_path / "t")
    task_folder(tmp_path / "t", {"meta_task": "retrieval", "data": "pairs.json"}, {})
    with pytest.raises(TaskError, match=r"pairs.json: does not exist \(named by 'data'"):
        load_task(tmp_path / "t")
    task_folder(tmp_path / "t", {"meta_task": "retrieval"}, {})
    with pytest.raises(TaskError, match="needs 'data'"):
        load_task(tmp_path / "t")


def test_unknown_meta_task_and_keys(tmp_path):
    task_folder(tmp_path / "t", {"meta_task": "segmentation"}, {})
    with pytest.raises(TaskError, match="unknown meta_task 'segmentation'") as caught:
        load_task(tmp_path / "t")
    assert "retrieval, classification, composed_retrieval" in str(caught.value)
    task_folder(tmp_path / "t", {"meta_task": "retrieval", "data": "p.json", "image_rot": "x"}, {"p.json": []})
    with pytest.raises(TaskError, match="unknown key.*image_rot"):
        load_task(tmp_path / "t")


def test_labels_without_prompts(tmp_path):
    with pytest.raises(TaskError, match="label.*without prompts.*'stroma'") as caught:
        load_task(classification(tmp_path, labels="image_name,label\na.png,tumor\nb.png,stroma\n"))
    assert isinstance(caught.value, PueError)
    assert "labels.csv" in caught.value.where


def test_template_without_placeholder(tmp_path):
    prompts = {"demo": {"classnames": {"tumor": ["tumor"], "normal": ["normal"]}, "templates": ["a tumor"]}}
    with pytest.raises(TaskError, match="without the CLASSNAME placeholder"):
        load_task(classification(tmp_path, prompts=prompts))


def test_missing_images_counted_and_named(tmp_path):
    images(tmp_path / "t", "a.png")
    pairs = [
        {"img": "a.png", "caption": "x"},
        {"img": "gone1.png", "caption": "y"},
        {"img": "gone2.png", "caption": "z"},
    ]
    task_folder(tmp_path / "t", {"meta_task": "retrieval", "data": "pairs.json"}, {"pairs.json": pairs})
    with pytest.raises(MissingImagesError, match=r"2 of 3 images do not exist.*'gone1.png', 'gone2.png'") as caught:
        load_task(tmp_path / "t")
    assert caught.value.missing == ["gone1.png", "gone2.png"]
    assert caught.value.hint and "image_root" in caught.value.hint


@pytest.mark.parametrize(("name", "content"), [("pairs.json", "[]"), ("pairs.jsonl", "\n\n")])
def test_empty_retrieval_task(tmp_path, name, content):
    task_folder(tmp_path / "t", {"meta_task": "retrieval", "data": name}, {name: content})
    with pytest.raises(TaskError, match="no records: the task is empty"):
        load_task(tmp_path / "t")


def test_empty_classification_task_and_bad_columns(tmp_path):
    with pytest.raises(TaskError, match="no rows: the task is empty"):
        load_task(classification(tmp_path, labels="image_name,label\n"))
    with pytest.raises(TaskError, match="needs the column.*label; found image_name, class"):
        load_task(classification(tmp_path, labels="image_name,class\na.png,tumor\n"))


def test_bad_records(tmp_path):
    images(tmp_path / "t", "a.png")
    task_folder(tmp_path / "t", {"meta_task": "retrieval", "data": "p.json"}, {"p.json": [{"img": "a.png"}]})
    with pytest.raises(TaskError, match="item 0 has no 'caption' or 'text'"):
        load_task(tmp_path / "t")
    task_folder(tmp_path / "t", {"meta_task": "retrieval", "data": "p.jsonl"}, {"p.jsonl": '{"img": "a.png",\n'})
    with pytest.raises(TaskError, match="line 1 is not valid JSON"):
        load_task(tmp_path / "t")
    mixed = [
        {"image": "a.png", "question": "q", "answer": "a"},
        {"source_image": "a.png", "modifier": "m", "target_text": "t"},
    ]
    task_folder(tmp_path / "t", {"meta_task": "composed_retrieval", "data": "p.json"}, {"p.json": mixed})
    with pytest.raises(TaskError, match="mixes"):
        load_task(tmp_path / "t")


# --- discovery ----------------------------------------------------------------------------------------
def test_discover_tasks(tmp_path):
    root = tmp_path / "data"
    for folder, name in (("b_folder", "beta"), ("a_folder", "alpha")):
        images(root / folder, "a.png")
        task_folder(
            root / folder,
            {"name": name, "meta_task": "retrieval", "data": "p.json"},
            {"p.json": [{"img": "a.png", "caption": "x"}]},
        )
    (root / "not_a_task").mkdir()
    assert [t.name for t in discover_tasks(root)] == ["alpha", "beta"]
    assert [t.name for t in discover_tasks(root, ["beta", "a_folder"])] == ["beta", "alpha"]
    assert [t.name for t in discover_tasks(root / "b_folder")] == ["beta"]
    with pytest.raises(TaskError, match="no task named 'gamma'.*tasks found: alpha, beta"):
        discover_tasks(root, ["gamma"])
    with pytest.raises(TaskError, match="holds no task folders"):
        discover_tasks(root / "not_a_task")
    with pytest.raises(TaskError, match="does not exist"):
        discover_tasks(tmp_path / "nowhere")
    task_folder(root / "b_folder", {"name": "alpha", "meta_task": "retrieval", "data": "p.json"}, {})
    with pytest.raises(TaskError, match="both named 'alpha'"):
        discover_tasks(root)


# --- pmeb-mini ----------------------------------------------------------------------------------------
def test_pmeb_mini_loads_and_is_truthful():
    index = json.loads((pmeb_mini_dir().parent / "patches" / "index.json").read_text())
    record = {p["file"]: p for p in index["patches"]}
    tasks = {t.name: t for t in discover_tasks(pmeb_mini_dir())}
    assert sorted(tasks) == ["mini_caption_retrieval", "mini_composed", "mini_stain_zeroshot", "mini_tissue_zeroshot"]
    assert {t.meta_task for t in tasks.values()} == {"retrieval", "classification", "composed_retrieval"}
    used = {name for t in tasks.values() for name in t.image_names()}
    assert {record[n]["set"] for n in used} == {"heldout", "background"}  # never calibration patches

    stain = tasks["mini_stain_zeroshot"].data
    assert all(
        record[i]["stain"] == label and record[i]["kind"] == "tissue"
        for i, label in zip(stain.images, stain.labels, strict=True)
    )
    assert set(stain.labels) == {"H&E", "IHC"}
    kind = tasks["mini_tissue_zeroshot"].data
    assert all(record[i]["kind"] == label for i, label in zip(kind.images, kind.labels, strict=True))
    assert set(kind.labels) == {"tissue", "background"}

    retrieval = tasks["mini_caption_retrieval"].data
    for image, caption in retrieval.pairs:
        patch, text = record[retrieval.images[image]], retrieval.captions[caption]
        assert ("H&E" in text or "CMU-1" in text) == (patch["source"] == "cmu_small_region.svs")
        assert ("Immunohistochemistry" in text) == (patch["stain"] == "IHC")
        assert ("no tissue" in text) == (patch["kind"] == "background")

    composed = tasks["mini_composed"].data
    for image, question, target in zip(composed.query_images, composed.query_texts, composed.targets, strict=True):
        patch, answer = record[image], composed.gallery[target]
        if "stain" in question:
            assert patch["kind"] == "tissue" and answer.startswith(patch["stain"])
        else:
            assert ("no tissue" in answer) == (patch["kind"] == "background")


def test_pmeb_mini_is_the_builders_output():
    index = json.loads((pmeb_mini_dir().parent / "patches" / "index.json").read_text())
    expected = build_pmeb_mini(index)
    shipped = {
        p.relative_to(pmeb_mini_dir()).as_posix(): p.read_text(encoding="utf-8")
        for p in pmeb_mini_dir().rglob("*")
        if p.is_file()
    }
    assert shipped == expected, "rerun: python -m pue.benchmarks.pmeb.mini"


# --- converters ---------------------------------------------------------------------------------------
def test_class_folders_to_classification(tmp_path):
    images(tmp_path / "crc", "ADI/1.tif", "ADI/2.png", "TUM/sub/3.jpg")
    (tmp_path / "crc" / "TUM" / "notes.txt").write_text("not an image")
    task = folders_to_classification(
        tmp_path / "crc",
        tmp_path / "tasks" / "crc",
        classnames={"ADI": ["adipose tissue", "fat"], "TUM": "tumor epithelium"},
        templates=["an image of CLASSNAME."],
    )
    data = task.data
    assert task.name == "crc" and task.meta_task == "classification"
    assert data.images == ["ADI/1.tif", "ADI/2.png", "TUM/sub/3.jpg"]
    assert data.labels == ["ADI", "ADI", "TUM"]
    assert data.prompts == ["an image of adipose tissue.", "an image of fat.", "an image of tumor epithelium."]
    assert json.loads((tmp_path / "tasks" / "crc" / "task.json").read_text())["image_root"] == "../../crc"
    with pytest.raises(OutputExistsError):
        folders_to_classification(tmp_path / "crc", tmp_path / "tasks" / "crc")
    with pytest.raises(TaskError, match="no synonyms for \\['TUM'\\]"):
        folders_to_classification(tmp_path / "crc", tmp_path / "x", classnames={"ADI": ["fat"]})
    default = folders_to_classification(tmp_path / "crc", tmp_path / "tasks" / "crc", overwrite=True)
    assert default.data.prompts[0] == "ADI."


def test_caption_csv_to_retrieval(tmp_path):
    images(tmp_path / "quilt" / "images", "a.jpg", "b.jpg")
    csv_path = tmp_path / "quilt" / "lookup.csv"
    csv_path.write_text('image_path,caption,other\na.jpg,"Tumor cells, with mitoses",1\nb.jpg,Normal stroma,2\n')
    assert (
        main(
            [
                "captions",
                str(csv_path),
                str(tmp_path / "tasks" / "quilt"),
                "--image-column",
                "image_path",
                "--image-root",
                str(tmp_path / "quilt" / "images"),
            ]
        )
        == 0
    )
    task = load_task(tmp_path / "tasks" / "quilt")
    assert task.name == "lookup" and task.data.captions == ["Tumor cells, with mitoses", "Normal stroma"]
    with pytest.raises(TaskError, match="has no column.*path"):
        captions_to_retrieval(csv_path, tmp_path / "other", image_column="path")
