"""Tiny checkpoints whose outliers behave like trained models' (issue 13): each fixture class plants what it says,
keeps its embeddings distinguishable, and its outliers matter to the function (removing them moves embeddings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pue.data import patch_set  # noqa: E402
from pue.export import ReferenceEmbedder  # noqa: E402

pytestmark = pytest.mark.slow
TEXTS = ["tumor", "benign stroma", "Lymph node with metastatic carcinoma in the subcapsular sinus."]
CLASSES = ("gains-few", "gains-all", "massive", "vit-highnorm")
# the Qwen-VL outlier presets (no vit-highnorm: `tiny_qwen.QWEN_NO_VIT_HIGHNORM`), one arch per class here (the
# others are measured by scripts/fidelity_matrix.py); the planters reach them through the same per-arch accessors
QWEN_FIXTURES = [("qwen3_vl", "massive"), ("qwen2_5_vl", "gains-few")]
FIXTURES = [(arch, preset) for arch in ("llava_next", "llava") for preset in CLASSES] + QWEN_FIXTURES


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tiny_checkpoint):
    """The session's checkpoints (seed 0, as the outlier bundles' parents); a reference of the module's own, since
    test_outliers_matter_to_the_function changes its weights (and puts them back)."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(arch: str, preset: str):
        if (arch, preset) not in cache:
            out = tiny_checkpoint(arch, preset)  # built once per session, shared with the outlier-report tests
            info = json.loads((out / "pue_tiny.json").read_text())["outliers"]
            reference = ReferenceEmbedder.load(out, tile_size=224)
            images = patch_set("heldout")
            cache[(arch, preset)] = (info, reference, images, unit(reference.embed_images(images)))
        return cache[(arch, preset)]

    return get


def embed(reference, images) -> np.ndarray:
    return unit(np.concatenate([reference.embed_images(images), reference.embed_texts(TEXTS)]))


def ablation_subset(images: list) -> list:
    """Both stains, fewer tiles: the ablated model embeds these again."""
    ihc = [p for p in images if p.name.startswith("ihc")]
    return [p for p in images if not p.name.startswith("ihc")][:6] + ihc[:4]


def remove_outliers(model, info: dict) -> None:
    """Undo what the fixture planted, leaving everything else: gains back to 1, the writing unit silenced."""
    with torch.no_grad():
        if info["kind"] in ("gains-few", "gains-all"):
            text, channels = model.model.language_model, torch.tensor(info["channels"])
            for layer in info["layers"]:
                text.layers[layer].input_layernorm.weight[channels] /= info["gain"]
                text.layers[layer].post_attention_layernorm.weight[channels] /= info["gain"]
        elif info["kind"] == "massive":
            model.model.language_model.layers[info["layer"]].mlp.down_proj.weight[:, info["intermediate_unit"]] = 0
        elif info["kind"] == "vit-highnorm":
            mlp = model.model.vision_tower.encoder.layers[info["layer"]].mlp
            mlp.fc2.weight[:, info["intermediate_unit"]] = 0


@pytest.mark.parametrize(("arch", "preset"), FIXTURES, ids=[f"{a}-{p}" for a, p in FIXTURES])
def test_fixture_plants_its_outliers_and_stays_distinguishable(built, arch, preset):
    info, reference, images, patches = built(arch, preset)
    assert info["kind"] == preset
    if preset == "massive":  # >= 1000x the median residual value on the trigger tokens, written by one block
        assert min(info["ratio_to_median_at_trigger_tokens"]) >= 1000
    if preset == "vit-highnorm":
        assert min(info["ratio_to_median_token_norm"]) >= 50 and info["max_ratio_at_other_tokens"] < 5
    if preset.startswith("gains"):
        assert info["gain"] == 100.0 and len(info["channels"]) == 3
    pairwise = patches @ patches.T
    n = len(patches)
    assert (pairwise.sum() - n) / (n * (n - 1)) < 0.95  # held-out patches stay distinguishable


@pytest.mark.parametrize(("arch", "preset"), FIXTURES, ids=[f"{a}-{p}" for a, p in FIXTURES])
def test_outliers_matter_to_the_function(built, arch, preset):
    info, reference, images, _ = built(arch, preset)
    images = ablation_subset(images)
    before = embed(reference, images)
    saved = {k: v.clone() for k, v in reference.model.state_dict().items()}
    try:
        remove_outliers(reference.model, info)
        after = embed(reference, images)
    finally:
        reference.model.load_state_dict(saved)
    assert np.sum(before * after, axis=1).min() < 0.99
