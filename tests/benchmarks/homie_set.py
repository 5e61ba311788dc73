"""A tiny PMEB set in HOMIE's file formats, built from the shipped patches (pue/data/patches), one folder per task
kind: retrieval with a duplicated caption (and a repeated image), zero-shot with prompt ensembles, composed
retrieval whose sorted gallery differs from its order of appearance, VQA with repeated answers, and multiple
choice with 2, 3 and 4 options."""

from __future__ import annotations

import json
from pathlib import Path

from pue.data import patches_dir

HE = ["heldout/cmu_x00448_y02688.jpg", "heldout/cmu_x00512_y02464.jpg", "heldout/cmu_x00640_y02240.jpg"]
IHC = ["heldout/ihc_x00000_y00288.jpg", "heldout/ihc_x00224_y00288.jpg"]

RETRIEVAL = [
    {"img": HE[0], "caption": "H&E-stained tissue."},
    {"img": HE[1], "caption": "H&E-stained tissue."},  # the same caption: a negative for HOMIE
    {"img": HE[2], "caption": "Colon mucosa, hematoxylin and eosin, with purple nuclei."},
    {"img": IHC[0], "caption": "Immunohistochemistry with brown DAB staining."},
    {"img": IHC[1], "caption": "Blue hematoxylin counterstain around DAB-positive glands."},
    {"img": HE[0], "caption": "Pink eosin stroma between glands."},  # the same image again, another caption
]
PROMPTS = {
    "stain": {
        "classnames": {
            "H&E": ["hematoxylin and eosin", "H&E staining"],
            "IHC": ["immunohistochemistry", "DAB staining"],
        },
        "templates": ["a histopathology image of CLASSNAME.", "CLASSNAME"],
    }
}
LABELS = [(HE[0], "H&E"), (HE[1], "H&E"), (HE[2], "H&E"), (IHC[0], "IHC"), (IHC[1], "IHC")]
VQA = [
    {"image": HE[0], "question": "What stain is used?", "key_finding_text": "H&E"},
    {"image": HE[1], "question": "What stain is used?", "key_finding_text": "H&E"},
    {"image": IHC[0], "question": "What stain is used?", "key_finding_text": "IHC"},
    {"image": HE[0], "question": "Is there tissue?", "key_finding_text": "yes"},
    {"image": IHC[1], "question": "Is there tissue?", "key_finding_text": "yes"},
    {"image": HE[2], "question": "Is this an IHC stain?", "key_finding_text": "no"},
    {"image": IHC[1], "question": "Is this an IHC stain?", "key_finding_text": "yes"},
]
COMPOSED = [  # targets appear IHC first; HOMIE's gallery is sorted by name (cmu… before ihc…)
    {"source_image": HE[0], "modifier": "as an immunohistochemistry stain", "target_image": IHC[0]},
    {"source_image": HE[1], "modifier": "with DAB staining", "target_image": IHC[1]},
    {"source_image": IHC[0], "modifier": "as hematoxylin and eosin", "target_image": HE[2]},
    {"source_image": IHC[1], "modifier": "in H&E", "target_image": HE[0]},
    {"source_image": HE[2], "modifier": "stained for DAB", "target_image": IHC[0]},
]
MCQ = [
    {"No": 1, "img": HE[0], "question": "Which stain?", "options": ["H&E", "IHC"], "answer": "H&E"},
    {"No": 2, "img": IHC[0], "question": "Which stain?", "options": ["H&E", "IHC", "Masson trichrome"],
     "answer": "IHC"},
    {"No": 3, "img": HE[1], "question": "What does the tile show?",
     "options": ["glass", "tissue", "a bubble", "a pen mark"], "answer": "tissue"},
    {"No": 4, "img": IHC[1], "question": "What colour is DAB?", "options": ["brown", "blue", "green"],
     "answer": "brown"},
]  # fmt: skip


def build_homie_set(root: Path) -> Path:
    """Write the five task folders under `root` (images stay in the package) and return `root`."""
    image_root = str(patches_dir())

    def task(name: str, spec: dict, files: dict) -> None:
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "task.json").write_text(json.dumps({"image_root": image_root, **spec}))
        for file, content in files.items():
            (folder / file).write_text(content if isinstance(content, str) else json.dumps(content))

    task("retrieval", {"meta_task": "retrieval", "data": "test.json"}, {"test.json": RETRIEVAL})
    labels = "image_name,label\n" + "".join(f"{image},{label}\n" for image, label in LABELS)
    task(
        "zeroshot",
        {"meta_task": "classification", "labels": "test.csv", "prompts": "prompts.json"},
        {"test.csv": labels, "prompts.json": PROMPTS},
    )
    task("vqa", {"meta_task": "composed_retrieval", "data": "test.json"}, {"test.json": VQA})
    task("composed", {"meta_task": "composed_retrieval", "data": "test.json"}, {"test.json": COMPOSED})
    task("mcq", {"meta_task": "multiple_choice", "data": "test.json"}, {"test.json": MCQ})
    return root
