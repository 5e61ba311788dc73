"""The numpy/Pillow preprocessor against transformers' slow (PIL) image processors, on real tissue tiles."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pue.bundle import ImagePreprocessing
from pue.errors import BundleError, CheckpointError, InputError
from pue.runtime.images import fit_to_tile, load_image
from pue.runtime.preprocess import ImagePreprocessor, preprocessing_from_config, select_best_resolution

transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

IHC = Path(__file__).resolve().parents[3] / "shared" / "data" / "ihc.png"  # ../shared beside the repo
E5V_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP224 = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
CLIP336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(not IHC.is_file(), reason="shared tissue image not available")


@pytest.fixture(scope="module")
def ihc() -> Image.Image:
    return load_image(IHC, 0)


def tiles_for(ihc: Image.Image, tile_size: int) -> list[Image.Image]:
    """Real tissue: direct crops at several places, a 256x256 crop, a 300x200 crop and the whole 512 image,
    all brought to the tile size by fit_to_tile (as the runtime and the reference do)."""
    tiles = [fit_to_tile(ihc.crop((x, y, x + tile_size, y + tile_size)), tile_size)[0] for x, y in [(0, 0), (288, 120)]]
    tiles += [fit_to_tile(ihc.crop(box), tile_size)[0] for box in [(40, 30, 296, 286), (100, 250, 400, 450)]]
    tiles.append(fit_to_tile(ihc, tile_size)[0])
    assert all(t.size == (tile_size, tile_size) and t.mode == "RGB" for t in tiles)
    return tiles


def compare(hf, tiles, kind, tile_size, vision_size, pinpoints=None, config=None):
    spec = preprocessing_from_config(
        config if config is not None else hf.to_dict(), tile_size, kind, vision_size, pinpoints
    )
    ours = ImagePreprocessor(spec)(tiles)
    reference = hf(tiles, return_tensors="np")["pixel_values"]
    assert ours.dtype == np.float32
    assert ours.shape == reference.shape
    diff = float(np.abs(ours - reference.astype(np.float32)).max())
    assert diff <= TOLERANCE, diff
    return spec, ours, diff


CASES = {
    # name: (processor class, kwargs, kind, tile size, vision image size, pinpoints, crops, expected shape tail)
    "llava_next_clip224_1x1": (
        LlavaNextImageProcessorPil,
        {**CLIP224, "image_grid_pinpoints": [[224, 224]]},
        "anyres", 224, 224, [[224, 224]], 2, (2, 3, 224, 224),
    ),
    "llava_next_e5v_tile224": (
        LlavaNextImageProcessorPil, {**CLIP336, "image_grid_pinpoints": E5V_PINPOINTS},
        "anyres", 224, 336, E5V_PINPOINTS, 3, (3, 3, 336, 336),
    ),
    "llava_next_e5v_tile512": (
        LlavaNextImageProcessorPil, {**CLIP336, "image_grid_pinpoints": E5V_PINPOINTS},
        "anyres", 512, 336, E5V_PINPOINTS, 5, (5, 3, 336, 336),
    ),
    "llava_clip224": (
        CLIPImageProcessorPil, CLIP224,
        "single", 224, 224, None, 1, (3, 224, 224),
    ),
    "llava_clip336_tile224": (
        CLIPImageProcessorPil, CLIP336, "single", 224, 336, None, 1, (3, 336, 336),
    ),
    "llava_processor_clip336": (
        LlavaImageProcessorPil, CLIP336, "single", 224, 336, None, 1, (3, 336, 336),
    ),
    "llava_siglip224": (
        SiglipImageProcessorPil, {"size": {"height": 224, "width": 224}}, "single", 224, 224, None, 1, (3, 224, 224),
    ),
    "llava_siglip384": (
        SiglipImageProcessorPil, {"size": {"height": 384, "width": 384}}, "single", 224, 384, None, 1, (3, 384, 384),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers_pil_processor(ihc, name):
    cls, kwargs, kind, tile_size, vision_size, pinpoints, crops, tail = CASES[name]
    tiles = tiles_for(ihc, tile_size)
    spec, ours, diff = compare(cls(**kwargs), tiles, kind, tile_size, vision_size, pinpoints)
    assert ours.shape == (len(tiles), *tail)
    assert spec.num_crops == crops
    assert spec.crop_size == tail[-1]
    assert spec.kind == kind and spec.tile_size == tile_size
    # the lookup-table normalisation reproduces transformers' float64 rescale + float32 normalise bit for bit
    assert diff == 0.0


def test_e5v_layout_is_base_plus_padded_1x2_grid(ihc):
    """For a 224 tile the best E5-V grid is 336x672: the 336 resize is padded by 168 black columns each side."""
    assert select_best_resolution(224, 224, E5V_PINPOINTS) == (336, 672)
    assert select_best_resolution(512, 512, E5V_PINPOINTS) == (672, 672)
    hf = LlavaNextImageProcessorPil(**CLIP336, image_grid_pinpoints=E5V_PINPOINTS)
    spec = preprocessing_from_config(hf.to_dict(), 224, "anyres", 336, E5V_PINPOINTS)
    pixels = ImagePreprocessor(spec)(tiles_for(ihc, 224)[:1])
    black = (0 - np.array(spec.image_mean, np.float32)) / np.array(spec.image_std, np.float32)
    np.testing.assert_array_equal(pixels[0, 1, :, :, :168], np.broadcast_to(black[:, None, None], (3, 336, 168)))
    np.testing.assert_array_equal(pixels[0, 2, :, :, 168:], np.broadcast_to(black[:, None, None], (3, 336, 168)))
    # the grid's left half holds the right half of the resized tile, the base crop the whole of it
    np.testing.assert_array_equal(pixels[0, 1, :, :, 168:], pixels[0, 0, :, :, :168])
    np.testing.assert_array_equal(pixels[0, 2, :, :, :168], pixels[0, 0, :, :, 168:])


def test_old_preprocessor_config_json_layout(ihc):
    """preprocessor_config.json of older checkpoints: int sizes, CLIP type name, keys left to class defaults."""
    config = {
        "crop_size": 336,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 336,
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
    }
    hf = CLIPImageProcessorPil(**{k: v for k, v in config.items() if not k.endswith(("_type", "_class"))})
    spec, _, _ = compare(hf, tiles_for(ihc, 224), "single", 224, 336, config=config)
    assert spec.processor_config["size"] == {"shortest_edge": 336}
    assert spec.processor_config["crop_size"] == {"height": 336, "width": 336}
    assert spec.rescale_factor == pytest.approx(1 / 255)


def test_transformers5_processor_config_layout(ihc):
    """processor_config.json["image_processor"] as transformers 5 saves it for LLaVA-NeXT."""
    hf = LlavaNextImageProcessorPil(**CLIP336, image_grid_pinpoints=E5V_PINPOINTS)
    saved = json.loads(json.dumps(hf.to_dict()))
    spec, _, _ = compare(hf, tiles_for(ihc, 224), "anyres", 224, 336, E5V_PINPOINTS, config=saved)
    resolved = spec.processor_config
    assert resolved["image_processor_type"] == "LlavaNextImageProcessor"
    assert resolved["image_grid_pinpoints"] == E5V_PINPOINTS
    assert resolved["resample"] == int(Image.Resampling.BICUBIC)
    assert spec.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_missing_keys_take_class_defaults(ihc):
    """A sparse config behaves like the transformers class constructed from it (SigLIP: 0.5 mean, no crop)."""
    spec = preprocessing_from_config({"image_processor_type": "SiglipImageProcessor"}, 224, "single", 224, None)
    assert spec.image_mean == [0.5, 0.5, 0.5] and spec.processor_config["do_center_crop"] is False
    ours = ImagePreprocessor(spec)(tiles_for(ihc, 224))
    reference = SiglipImageProcessorPil()(tiles_for(ihc, 224), return_tensors="np")["pixel_values"]
    assert float(np.abs(ours - reference).max()) <= TOLERANCE


def test_spec_survives_manifest_json_round_trip(ihc):
    hf = LlavaNextImageProcessorPil(**CLIP336, image_grid_pinpoints=E5V_PINPOINTS)
    spec = preprocessing_from_config(hf.to_dict(), 512, "anyres", 336, E5V_PINPOINTS)
    restored = ImagePreprocessing(**json.loads(json.dumps(dataclasses.asdict(spec))))
    tiles = tiles_for(ihc, 512)[:2]
    np.testing.assert_array_equal(ImagePreprocessor(restored)(tiles), ImagePreprocessor(spec)(tiles))
    assert ImagePreprocessor(restored).output_shape == (5, 3, 336, 336)


def test_empty_batch_has_the_right_shape():
    spec = preprocessing_from_config(LlavaNextImageProcessorPil(**CLIP336).to_dict(), 224, "anyres", 336, None)
    assert ImagePreprocessor(spec)([]).shape == (0, 3, 3, 336, 336)


def test_config_errors():
    clip = CLIPImageProcessorPil(**CLIP336).to_dict()
    with pytest.raises(CheckpointError, match="vision tower takes 224px"):
        preprocessing_from_config(clip, 224, "single", 224, None)
    with pytest.raises(CheckpointError, match="unknown image preprocessing kind"):
        preprocessing_from_config(clip, 224, "tiles", 336, None)
    next_config = LlavaNextImageProcessorPil(**CLIP336, image_grid_pinpoints=E5V_PINPOINTS).to_dict()
    with pytest.raises(CheckpointError, match="image_grid_pinpoints differ"):
        preprocessing_from_config(next_config, 224, "anyres", 336, [[336, 336]])
    with pytest.raises(CheckpointError, match="resample"):
        preprocessing_from_config({**clip, "resample": 42}, 224, "single", 336, None)
    with pytest.raises(CheckpointError, match="crop_size"):
        preprocessing_from_config({**clip, "crop_size": {"shortest_edge": 3}}, 224, "single", 336, None)


def test_tile_errors_name_the_index(ihc):
    spec = preprocessing_from_config(CLIPImageProcessorPil().to_dict(), 224, "single", 224, None)
    preprocessor = ImagePreprocessor(spec)
    good = tiles_for(ihc, 224)[0]
    with pytest.raises(InputError, match=r"item 1: tile is 256x256 px") as info:
        preprocessor([good, ihc.crop((0, 0, 256, 256))])
    assert info.value.index == 1
    with pytest.raises(InputError, match=r"item 2: expected an RGB tile"):
        preprocessor([good, good, good.convert("L")])
    with pytest.raises(InputError, match=r"item 0: expected a PIL image"):
        preprocessor([np.asarray(good)])


def test_malformed_spec_is_a_bundle_error():
    spec = preprocessing_from_config(CLIPImageProcessorPil().to_dict(), 224, "single", 224, None)
    broken = dataclasses.replace(spec, processor_config={k: v for k, v in spec.processor_config.items() if k != "size"})
    with pytest.raises(BundleError, match="lacks size"):
        ImagePreprocessor(broken)
    with pytest.raises(BundleError, match="says 1 crops of 999px"):
        ImagePreprocessor(dataclasses.replace(spec, crop_size=999))


def test_modules_import_no_heavy_packages():
    """The runtime's image path needs only numpy and Pillow (docs/architecture.md: no torch, transformers or onnx)."""
    import subprocess
    import sys

    code = (
        "import sys, pue.runtime.images, pue.runtime.preprocess; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "hf,kind,vision_size,crops",
    [
        (CLIPImageProcessorPil(do_pad=True, pad_size={"height": 240, "width": 240}), "single", 240, 1),
        (LlavaImageProcessorPil(do_pad=True), "single", 224, 1),
        (
            LlavaNextImageProcessorPil(
                size={"height": 224, "width": 224},
                do_center_crop=False,
                image_grid_pinpoints=[[224, 448], [448, 448]],
            ),
            "anyres",
            224,
            3,
        ),
        (  # a grid that the patch size does not divide: edge patches are smaller, then resized and cropped
            LlavaNextImageProcessorPil(
                size={"shortest_edge": 200}, crop_size={"height": 180, "width": 180}, image_grid_pinpoints=[[300, 500]]
            ),
            "anyres",
            180,
            7,
        ),
    ],
    ids=["clip_pad_size", "llava_pad_to_square", "next_height_width_no_crop", "next_uneven_grid"],
)
def test_unusual_settings_match(ihc, hf, kind, vision_size, crops):
    spec, _, diff = compare(hf, tiles_for(ihc, 224), kind, 224, vision_size)
    assert spec.num_crops == crops
    assert diff == 0.0
