"""Shared by the Qwen-VL tests: a small held-out set, the mixed padded batch checked against the reference, and the
Qwen3-VL-Embedding recipe with a Matryoshka range the tiny model can show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pue.data import patch_set

CAPTION = "a long caption: invasive ductal carcinoma with stroma"


def small_heldout() -> list[Path]:
    """Three H&E tiles and one IHC tile."""
    paths = patch_set("heldout")
    return [p for p in paths if not p.name.startswith("ihc")][:3] + [p for p in paths if p.name.startswith("ihc")][:1]


MATRYOSHKA_CUT = 32  # the Matryoshka dimension of the tiny Qwen3-VL-Embedding bundle (the tiny model is 64 wide)


def export_heldout() -> list[Path]:
    """The Qwen exports' gate images: one of each stain (their image sets are the pair)."""
    images = small_heldout()
    return [images[0], images[-1]]


def embedding_recipe(folder: Path) -> Path:
    """The shipped Qwen3-VL-Embedding recipe with a Matryoshka minimum the 64-wide tiny model can show."""
    from pue.export.recipe import shipped_recipe_path

    data = json.loads(shipped_recipe_path("qwen3_vl_embedding").read_text())
    data["matryoshka"] = {"min_dim": 16}
    path = folder / "recipe_qwen3_vl_embedding.json"
    path.write_text(json.dumps(data))
    return path


def mixed_batch_cosines(bundle: Path, reference: Any) -> np.ndarray:
    """Per-row cosines of one padded batch (text, image, composed, a 2-image set, short text) embedded by the bundle
    against the reference embedding each row alone."""
    from pue.runtime import Embedder, Query

    images = small_heldout()
    expected = np.concatenate(
        [
            reference.embed_texts([CAPTION]),
            reference.embed_images(images[:1]),
            reference.embed_composed(images[1:2], ["as IHC"]),
            reference.embed_image_sets([images[2:4]]),
            reference.embed_texts(["necrosis"]),
        ]
    )
    queries = [
        Query(text=CAPTION),
        Query(image=images[0]),
        Query(image=images[1], text="as IHC"),
        Query(images=images[2:4]),
        Query(text="necrosis"),
    ]
    with Embedder.load(bundle) as embedder:
        got = embedder.embed(queries, batch_size=len(queries))
    return np.sum(got * expected, axis=1)
