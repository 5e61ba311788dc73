"""Optimisation profiles and the rebuild command, derived from a manifest (no TensorRT needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_bundle

from pue.bundle import TensorSpec, read_manifest
from pue.errors import BundleError, PueError
from pue.export.tensorrt.metadata import rebuild_command
from pue.export.tensorrt.profiles import (
    BatchRange,
    check_max_images,
    default_max_seq,
    engine_profiles,
    parse_batch,
    resolve_max_seq,
)
from pue.runtime.backends.tensorrt_compat import BuildFlags, ShapeRange


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return read_manifest(tiny_bundle.make_tiny_bundle(tmp_path_factory.mktemp("profiles") / "bundle"))


@pytest.fixture
def e5v(tiny):
    """The tiny manifest in the E5-V geometry: 3 crops of 336 px, 1,176 image tokens, hidden 4096."""
    manifest = type(tiny).from_dict(tiny.to_dict())
    manifest.graphs["vision"].inputs = [TensorSpec("pixel_values", "float32", ["batch", 3, 3, 336, 336])]
    manifest.graphs["decoder"].inputs[2] = TensorSpec("image_features", "float32", ["batch", "image_tokens", 4096])
    manifest.tokens_per_image, manifest.max_seq_len, manifest.hidden_size = 1176, 4096, 4096
    return manifest


def test_parse_batch():
    assert parse_batch("1:8:32") == BatchRange(1, 8, 32)
    assert str(parse_batch("4:4:4")) == "4:4:4"
    for bad in ("8", "1:8", "0:8:32", "8:4:32", "1:64:32", "a:b:c", "1:8:32:64"):
        with pytest.raises(PueError, match="MIN:OPT:MAX"):
            parse_batch(bad)


def test_default_max_seq_leaves_room_for_text(e5v, tiny):
    assert default_max_seq(e5v) == 1728  # 1176 + 512 = 1688, rounded up to a multiple of 64
    assert default_max_seq(tiny) == 128  # capped by the model's max_seq_len
    assert resolve_max_seq(e5v, None) == 1728
    assert resolve_max_seq(e5v, 2048) == 2048
    with pytest.raises(PueError, match=r"leaves no room for a prompt of 1 image\(s\)"):
        resolve_max_seq(e5v, 1000)
    with pytest.raises(PueError, match="exceeds the model's maximum sequence 4096"):
        resolve_max_seq(e5v, 8192)


def test_profiles_in_the_e5v_geometry(e5v):
    profiles = engine_profiles(e5v, BatchRange(1, 8, 32), 1728)
    assert profiles["vision"] == {
        "pixel_values": ShapeRange((1, 3, 3, 336, 336), (8, 3, 3, 336, 336), (32, 3, 3, 336, 336)),
    }
    decoder = profiles["decoder"]
    assert decoder["input_ids"] == ShapeRange((1, 1), (8, 1240), (32, 1728))  # opt: an image prompt + 64
    assert decoder["attention_mask"] == decoder["input_ids"]
    # all-text batches send a single (zero) image token: the dimension starts at 1
    assert decoder["image_features"] == ShapeRange((1, 1, 4096), (8, 1176, 4096), (32, 1176, 4096))


def test_profiles_cover_rows_of_several_images(e5v):
    """--max-images 4: the vision engine takes 4 images per row of the largest batch, the decoder 4 × 1,176 image
    tokens per row, and the default --max-seq leaves room for a prompt of 4 images."""
    assert default_max_seq(e5v, 4) == 4096  # 4 × 1176 + 512 = 5216, capped by max_seq_len
    assert resolve_max_seq(e5v, None, 2) == 2880  # 2 × 1176 + 512 = 2864, rounded up to 2880
    with pytest.raises(PueError, match=r"leaves no room for a prompt of 4 image\(s\) \(4704 image tokens"):
        resolve_max_seq(e5v, 4096, 4)
    profiles = engine_profiles(e5v, BatchRange(1, 8, 32), 2880, max_images=2)
    assert profiles["vision"]["pixel_values"].max == (64, 3, 3, 336, 336)
    assert profiles["vision"]["pixel_values"].opt == (8, 3, 3, 336, 336)
    assert profiles["decoder"]["image_features"] == ShapeRange((1, 1, 4096), (8, 1176, 4096), (32, 2352, 4096))


def test_a_deepstack_input_gets_the_image_feature_ranges(e5v):
    """Qwen3-VL's decoder takes deepstack_features [batch, image_tokens, levels, hidden] beside image_features."""
    e5v.graphs["decoder"].inputs.append(TensorSpec("deepstack_features", "float32", ["batch", "image_tokens", 3, 4096]))
    decoder = engine_profiles(e5v, BatchRange(1, 8, 32), 2880, max_images=2)["decoder"]
    assert decoder["deepstack_features"] == ShapeRange((1, 1, 3, 4096), (8, 1176, 3, 4096), (32, 2352, 3, 4096))
    assert decoder["image_features"] == ShapeRange((1, 1, 4096), (8, 1176, 4096), (32, 2352, 4096))


def test_max_images_needs_a_bundle_that_takes_several(e5v):
    assert check_max_images(e5v, 4) == 4
    with pytest.raises(PueError, match="must be a positive integer"):
        check_max_images(e5v, 0)
    e5v.prompts.image_separator = None
    assert check_max_images(e5v, 1) == 1
    with pytest.raises(PueError, match=r"--max-images 2: this bundle takes one image per row.*pue-export onnx"):
        check_max_images(e5v, 2)


def test_profiles_without_crops(tiny):
    profiles = engine_profiles(tiny, BatchRange(2, 4, 8), 16)
    assert profiles["vision"]["pixel_values"] == ShapeRange((2, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))
    assert profiles["decoder"]["input_ids"] == ShapeRange((2, 1), (4, 16), (8, 16))  # opt capped by max


def test_dynamic_pixel_dimensions_are_refused(e5v):
    e5v.graphs["vision"].inputs = [TensorSpec("pixel_values", "float32", ["batch", "crops", 3, 336, 336])]
    with pytest.raises(BundleError, match="only the batch may be dynamic"):
        engine_profiles(e5v, BatchRange(1, 8, 32), 1728)
    e5v.graphs["vision"].inputs = [TensorSpec("pixels", "float32", ["batch", 3, 336, 336])]
    with pytest.raises(BundleError, match="no input 'pixel_values'"):
        engine_profiles(e5v, BatchRange(1, 8, 32), 1728)


def test_rebuild_command_repeats_every_flag():
    flags = BuildFlags(version_compatible=True, hardware_compat="ampere_plus", timing_cache="/cache/trt cache.bin")
    command = rebuild_command(Path("/data/fp16 bundle"), Path("/data/engines"), BatchRange(1, 4, 16), 1728, flags, 8)
    assert command == (
        "pue-export trt '/data/fp16 bundle' -o /data/engines --batch 1:4:16 --max-seq 1728 "
        "--workspace 8 --version-compatible --hardware-compat ampere_plus "
        "--timing-cache '/cache/trt cache.bin' --overwrite"
    )
    plain = rebuild_command(Path("/p"), Path("/o"), BatchRange(1, 8, 32), 600, BuildFlags(), None)
    assert plain == "pue-export trt /p -o /o --batch 1:8:32 --max-seq 600 --overwrite"
