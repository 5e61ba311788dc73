"""`Embedder` on FP32 bundles against `ReferenceEmbedder` (same tile size), and its handling of bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pue.data import patch_set
from pue.errors import InputError
from pue.fidelity import cosine_rows
from pue.gate_set import GATE_MODIFIERS, GATE_TEXTS
from pue.runtime import Embedder, Query

CASES = [("llava_next", "ci"), ("llava_next", "e5v"), ("llava", "ci")]


@pytest.fixture(scope="module")
def heldout():
    return patch_set("heldout")


@pytest.mark.parametrize(("arch", "preset"), CASES)
def test_matches_reference(fp32_bundle, reference_embedder, heldout, arch, preset):
    embedder = Embedder.load(fp32_bundle(arch, preset))
    reference = reference_embedder(arch, preset)
    images = heldout[:6]
    for got, want in (
        (embedder.embed_images(images), reference.embed_images(images)),
        (embedder.embed_texts(GATE_TEXTS), reference.embed_texts(GATE_TEXTS)),
        (
            embedder.embed_composed(images[:4], GATE_MODIFIERS[:4]),
            reference.embed_composed(images[:4], GATE_MODIFIERS[:4]),
        ),
    ):
        assert got.dtype == np.float32
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert cosine_rows(got, want).min() >= 0.9999
    mixed = embedder.embed(
        [Query(text="stroma"), Query(image=images[1]), Query(image=images[2], text="IHC"), Query(text="")]
    )
    want = np.concatenate(
        [
            reference.embed_texts(["stroma"]),
            reference.embed_images([images[1]]),
            reference.embed_composed([images[2]], ["IHC"]),
            reference.embed_texts([""]),
        ]
    )
    assert cosine_rows(mixed, want).min() >= 0.9999


@pytest.mark.parametrize("size", [(256, 256), (300, 200), (200, 300)])
def test_other_image_sizes_are_brought_to_the_tile(fp32_bundle, reference_embedder, size):
    source = Image.open(patch_set("heldout")[0])
    image = source.convert("RGB").resize(size, Image.BILINEAR)
    got = Embedder.load(fp32_bundle()).embed_images([image])
    want = reference_embedder().embed_images([image])
    assert cosine_rows(got, want).min() >= 0.9999


def test_inputs_forms_agree(fp32_bundle, heldout):
    embedder = Embedder.load(fp32_bundle())
    path = heldout[0]
    pil = Image.open(path).convert("RGB")
    array = np.asarray(pil)
    out = embedder.embed_images([path, str(path), pil, array])
    assert np.abs(out - out[0]).max() < 1e-6


def test_batching_and_order(fp32_bundle, heldout):
    embedder = Embedder.load(fp32_bundle())
    images = heldout[:5]
    whole = embedder.embed_images(images, batch_size=8)
    split = embedder.embed_images(images, batch_size=2)
    singles = np.concatenate([embedder.embed_images([i]) for i in images])
    assert np.abs(whole - split).max() < 1e-5
    assert np.abs(whole - singles).max() < 1e-5


def test_empty_inputs(fp32_bundle):
    embedder = Embedder.load(fp32_bundle())
    assert embedder.embed_images([]).shape == (0, embedder.dimension)
    assert embedder.embed_texts([]).shape == (0, embedder.dimension)
    assert embedder.embed_texts([""]).shape == (1, embedder.dimension)


def test_bad_items_are_named(fp32_bundle, heldout, tmp_path):
    embedder = Embedder.load(fp32_bundle())
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(InputError, match=r"item 1.*notes\.png"):
        embedder.embed_images([heldout[0], fake])
    with pytest.raises(InputError, match="item 2"):
        embedder.embed_images([heldout[0], heldout[1], tmp_path / "missing.png"])
    with pytest.raises(InputError, match="item 0"):
        embedder.embed_images([np.zeros((10, 10), np.uint8)])
    with pytest.raises(InputError, match="item 1"):
        embedder.embed_texts(["fine", "sneaky <image> token"])
    with pytest.raises(InputError):
        embedder.embed_composed([heldout[0]], ["a", "b"])
    with pytest.raises(InputError):
        embedder.embed_texts("a single string")


def test_truncation(fp32_bundle):
    embedder = Embedder.load(fp32_bundle())
    long_text = "tissue " * (embedder.manifest.max_seq_len + 50)
    with pytest.warns(UserWarning, match="longer than max_seq_len"):
        out = embedder.embed_texts([long_text])
    assert out.shape == (1, embedder.dimension)
    with pytest.raises(InputError, match="item 0"):
        embedder.embed_texts([long_text], truncate=False)


def test_stage_times_are_recorded(fp32_bundle, heldout):
    embedder = Embedder.load(fp32_bundle())
    embedder.embed_images(heldout[:2])
    times = embedder.stage_times()
    assert times["preprocess"] > 0 and times["vision"] > 0 and times["decoder"] > 0
