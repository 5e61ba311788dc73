"""Rows of several images (issue 16) against the PyTorch reference: k = 1, 2 and 4 images mixed in one batch with
texts, single images and composed rows, right and left padding, both layouts, both exporters; token ids equal to
the HF processor's; an old-format bundle runs single images and refuses several with the re-export command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pue.errors import InputError
from pue.fidelity import cosine_rows
from pue.runtime import Embedder, Query

# both architectures with the default exporter (torchscript); the dynamo exporter on LLaVA-NeXT, the architecture
# with more graph (anyres crops, packing), as in test_onnx_export.py
LAYOUTS = [
    ("llava_next", "torchscript"),
    ("llava_next", "dynamo"),
    ("llava", "torchscript"),
]


def left_padded(input_ids: np.ndarray, attention_mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The same rows with their padding moved to the left."""
    ids, mask = np.full_like(input_ids, pad_id), np.zeros_like(attention_mask)
    for row in range(len(ids)):
        length = int(attention_mask[row].sum())
        ids[row, ids.shape[1] - length :] = input_ids[row, :length]
        mask[row, ids.shape[1] - length :] = 1
    return ids, mask


def queries_and_expected(reference, tiles) -> tuple[list[Query], np.ndarray]:
    """The mixed batch (texts, sets of 1, 2 and 4 images, single images, composed rows) and the reference's rows."""
    four, two, one = tiles[0:4], tiles[4:6], tiles[6:7]
    composed_pair = (tiles[7:9], "more lymphocytes")
    queries = [
        Query(text="an H&E section with glands"),
        Query(images=four),
        Query(image=tiles[9]),
        Query(images=composed_pair[0], text=composed_pair[1]),
        Query(images=two),
        Query(image=tiles[1], text="less stroma"),
        Query(images=one),
        Query(text="necrosis"),
    ]
    want = np.concatenate(
        [
            reference.embed_texts(["an H&E section with glands"]),
            reference.embed_image_sets([four]),
            reference.embed_images([tiles[9]]),
            reference.embed_image_sets([composed_pair[0]], texts=[composed_pair[1]]),
            reference.embed_image_sets([two]),
            reference.embed_composed([tiles[1]], ["less stroma"]),
            reference.embed_image_sets([one]),
            reference.embed_texts(["necrosis"]),
        ]
    )
    # k = 1 through images= is the single-image row
    np.testing.assert_allclose(want[6], reference.embed_images(one)[0], atol=1e-6)
    return queries, want


@pytest.fixture(scope="module")
def expected_rows(reference_embedder, gate_images):
    """expected_rows(arch) → (queries, the reference's rows): computed once per architecture, for both exporters."""
    cache: dict[str, tuple[list[Query], np.ndarray]] = {}

    def get(arch: str) -> tuple[list[Query], np.ndarray]:
        if arch not in cache:
            cache[arch] = queries_and_expected(reference_embedder(arch), gate_images)
        return cache[arch]

    return get


@pytest.mark.parametrize(("arch", "exporter"), LAYOUTS)
def test_multi_image_rows_match_reference_in_a_mixed_batch(
    fp32_bundle, reference_embedder, expected_rows, gate_images, arch, exporter
):
    bundle = fp32_bundle(arch, "ci", exporter)
    reference = reference_embedder(arch)
    queries, want = expected_rows(arch)
    tiles = gate_images
    four, two, one = tiles[0:4], tiles[4:6], tiles[6:7]
    with Embedder.load(bundle) as embedder:
        assert embedder.takes_image_sets
        # both sides agree how many images fit max_seq_len (the gate embeds only sets that fit)
        assert embedder.max_images_per_row == reference.max_images_per_row == {"llava_next": 7, "llava": 15}[arch]
        got = embedder.embed(queries, batch_size=len(queries))  # one batch, right padding
        cosines = cosine_rows(got, want)
        assert cosines.min() >= 0.9999, cosines

        # the same batch with left padding, straight through the backend
        rows = [
            embedder.prompts.encode(q.kind, q.text, index=i, images=len(q.image_list))[0] for i, q in enumerate(queries)
        ]
        input_ids, attention_mask = embedder.prompts.pad(rows)
        image_rows = np.asarray([row for row, q in enumerate(queries) for _ in q.image_list], np.int64)
        pixels = embedder.pixel_values([image for q in queries for image in q.image_list])
        right = embedder.backend.run(input_ids, attention_mask, pixels, image_rows)
        left = embedder.backend.run(
            *left_padded(input_ids, attention_mask, embedder.prompts.pad_token_id), pixels, image_rows
        )
        assert np.max(np.abs(right - got)) <= 1e-5
        assert cosine_rows(left, want).min() >= 0.9999
        assert np.max(np.abs(left - right)) <= 1e-5

        # embed_image_sets: one vector per set, sets of different sizes in one call
        sets = embedder.embed_image_sets([two, four, one])
        assert cosine_rows(sets, want[[4, 1, 6]]).min() >= 0.9999

        # token ids: the runtime's equal what the HF processor feeds the model for the same rendered prompt
        for k, images in ((2, two), (4, four)):
            prompt = reference.prompt("image", images=k)
            encoded = reference.processor(
                text=[prompt], images=reference.tiles(images), return_tensors="np", add_special_tokens=False
            )
            assert encoded["input_ids"][0].tolist() == embedder.prompts.encode("image", None, images=k)[0]


def test_a_multi_image_row_past_max_seq_len_is_refused_with_the_count(fp32_bundle, gate_images, tmp_path):
    bundle = tmp_path / "short"
    shutil.copytree(fp32_bundle("llava_next", "ci"), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    tokens = manifest["tokens_per_image"]
    manifest["max_seq_len"] = 3 * tokens
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with Embedder.load(bundle) as embedder:
        assert embedder.embed_image_sets([gate_images[:2]]).shape == (1, embedder.dimension)
        with pytest.raises(InputError, match=rf"item 1: the row's 3 images take {3 * tokens} tokens"):
            embedder.embed([Query(text="x"), Query(images=gate_images[:3], text="tumor")])


def test_old_format_bundle_runs_single_images_and_refuses_several(fp32_bundle, gate_images, tmp_path):
    source = fp32_bundle("llava_next", "ci")
    bundle = tmp_path / "format-1.1"
    shutil.copytree(source, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format_version"] = "1.1"
    del manifest["prompts"]["image_separator"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with Embedder.load(bundle) as old, Embedder.load(source) as new:
        assert not old.takes_image_sets
        np.testing.assert_array_equal(old.embed_images(gate_images[:2]), new.embed_images(gate_images[:2]))
        with pytest.raises(InputError, match=r"item 0: the row has 2 images.*pue-export onnx"):
            old.embed_image_sets([gate_images[:2]])
