"""Qwen2-VL patch preprocessing in numpy against transformers' `Qwen2VLImageProcessorPil` on real tissue tiles:
pixel values (≤ 1e-5, bit-identical in practice) and the token count per tile, derived from the processor config."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pue.data import patch_set
from pue.errors import CheckpointError, InputError
from pue.runtime.images import fit_to_tile, load_image
from pue.runtime.preprocess import ImagePreprocessor
from pue.runtime.preprocess_patches import preprocessing_for_patches, smart_resize

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    smart_resize as hf_smart_resize,
)

TOLERANCE = 1e-5
# (processor settings, tile size, resized side): the defaults keep 224; GME's minimum of 448² pixels turns a 224
# tile into 448; a low maximum shrinks 512 to 252; Qwen3-VL-like patches of 16 (factor 32) turn 224 into 224.
CASES = [
    ({}, 224, 224),
    ({"min_pixels": 448 * 448}, 224, 448),
    ({"max_pixels": 256 * 256}, 512, 252),
    ({"patch_size": 16}, 224, 224),
]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    paths = patch_set("heldout")
    he = [p for p in paths if not p.name.startswith("ihc")][:2]
    ihc = [p for p in paths if p.name.startswith("ihc")][:1]
    return [load_image(path, index) for index, path in enumerate(he + ihc)]


@pytest.mark.parametrize(("settings", "tile_size", "side"), CASES)
def test_pixels_and_token_count_match_the_hf_processor(images, settings, tile_size, side):
    hf = Qwen2VLImageProcessorPil(**settings)
    tiles = [fit_to_tile(image, tile_size)[0] for image in images]
    spec = preprocessing_for_patches(hf.to_dict(), tile_size)
    ours = ImagePreprocessor(spec)(tiles)
    encoded = hf(tiles, return_tensors="np")
    reference = encoded["pixel_values"].reshape(ours.shape)
    assert ours.dtype == np.float32
    assert float(np.abs(ours - reference).max()) <= TOLERANCE
    config = spec.processor_config
    assert config["resized"] == [side, side]
    grid = encoded["image_grid_thw"]
    assert (grid == [1, side // hf.patch_size, side // hf.patch_size]).all()
    patches = hf.get_number_of_image_patches(tile_size, tile_size)
    assert config["patches"] == patches and config["tokens_per_image"] == patches // hf.merge_size**2


def test_published_config_keys_min_and_max_pixels_are_read():
    """Published preprocessor_config.json files carry min_pixels / max_pixels rather than a size dict."""
    spec = preprocessing_for_patches(
        {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 448 * 448, "max_pixels": 1280 * 28 * 28},
        224,
    )
    assert spec.processor_config["resized"] == [448, 448] and spec.processor_config["tokens_per_image"] == 256


@pytest.mark.parametrize("side", [28, 100, 224, 333, 513, 1000])
def test_smart_resize_is_transformers_arithmetic(side):
    for min_pixels, max_pixels in [(56 * 56, 28 * 28 * 1280), (448 * 448, 1280 * 28 * 28), (3136, 200_000)]:
        ours = smart_resize(side, side + 7, 28, min_pixels, max_pixels)
        assert ours == hf_smart_resize(side, side + 7, 28, min_pixels, max_pixels)


def test_bad_settings_and_tiles_are_refused(images):
    with pytest.raises(CheckpointError, match="merge_size"):
        preprocessing_for_patches({"merge_size": 0}, 224)
    with pytest.raises(CheckpointError, match="multiple of"):
        preprocessing_for_patches({"do_resize": False}, 200)
    preprocessor = ImagePreprocessor(preprocessing_for_patches({}, 224))
    with pytest.raises(InputError, match="224x224"):
        preprocessor([fit_to_tile(images[0], 112)[0]])
