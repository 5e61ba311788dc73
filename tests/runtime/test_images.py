"""load_image: strict input checks and documented mode conversions; fit_to_tile: the tile-size policy."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pue.errors import InputError, PueError
from pue.runtime.images import fit_to_tile, load_image

IHC = Path(__file__).resolve().parents[3] / "shared" / "data" / "ihc.png"  # ../shared beside the repo


def rng_rgb(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def expect_input_error(item, index: int, *fragments: str, path: Path | None = None) -> InputError:
    with pytest.raises(InputError) as info:
        load_image(item, index)
    error = info.value
    assert isinstance(error, PueError)
    assert error.index == index
    assert f"item {index}" in str(error)
    if path is not None:
        assert error.path == str(path)
        assert str(path) in str(error)
    for fragment in fragments:
        assert fragment in str(error), (fragment, str(error))
    return error


# ---------------------------------------------------------------------------------------------------------------
# good inputs
# ---------------------------------------------------------------------------------------------------------------


def test_path_pil_and_array_give_the_same_rgb(tmp_path):
    array = rng_rgb()
    path = tmp_path / "tile.png"
    Image.fromarray(array).save(path)
    for item in (path, str(path), Image.fromarray(array), array):
        image = load_image(item, 0)
        assert image.mode == "RGB" and image.size == (32, 24)
        np.testing.assert_array_equal(np.asarray(image), array)


def test_file_image_stays_usable_after_the_file_is_closed(tmp_path):
    path = tmp_path / "tile.png"
    Image.fromarray(rng_rgb()).save(path)
    image = load_image(path, 0)
    assert image.getpixel((0, 0)) == tuple(rng_rgb()[0, 0])
    path.unlink()
    assert image.resize((8, 8)).size == (8, 8)


def test_real_tissue_png():
    if not IHC.is_file():
        pytest.skip("shared tissue image not available")
    image = load_image(IHC, 0)
    assert image.mode == "RGB" and image.size == (512, 512)


def test_non_contiguous_array():
    array = rng_rgb(40, 40)
    view = array[::2, ::-1]
    np.testing.assert_array_equal(np.asarray(load_image(view, 0)), view)


# ---------------------------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    expect_input_error(path, 3, "file not found", path=path)
    expect_input_error(str(path), 4, "file not found", path=path)


def test_directory(tmp_path):
    expect_input_error(tmp_path, 2, "is a directory", path=tmp_path)


def test_empty_path():
    expect_input_error("", 5, "empty path")


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif"), ("BMP", "bmp")])
def test_truncated_file(tmp_path, fmt, suffix):
    data = png_bytes(Image.fromarray(rng_rgb(64, 64)), fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    expect_input_error(path, 7, "truncated", path=path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    expect_input_error(path, 1, "not an image file", path=path)


def test_corrupt_png_body(tmp_path):
    data = bytearray(png_bytes(Image.fromarray(rng_rgb(64, 64))))
    data[60:200] = bytes(140)  # wipe part of the compressed image data
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    expect_input_error(path, 0, path=path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    expect_input_error(path, 0, "not an image file", path=path)


@pytest.mark.parametrize("side", [12, 30])  # 144 px: Pillow's warning level; 900 px: its error level
def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch, side):
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    expect_input_error(path, 9, "decompression-bomb", path=path)


# ---------------------------------------------------------------------------------------------------------------
# bad arrays, PIL images and types
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array,fragments",
    [
        (np.zeros((8, 8), np.uint8), ["found shape (8, 8)", "uint8"]),
        (np.zeros((8, 8, 4), np.uint8), ["found shape (8, 8, 4)"]),
        (np.zeros((3, 8, 8), np.uint8), ["found shape (3, 8, 8)"]),
        (np.zeros((8, 8, 1), np.uint8), ["found shape (8, 8, 1)"]),
        (np.zeros((2, 8, 8, 3), np.uint8), ["found shape (2, 8, 8, 3)"]),
        (np.zeros((8, 8, 3), np.uint16), ["dtype uint16", "uint8"]),
        (np.zeros((8, 8, 3), np.int64), ["dtype int64"]),
        (np.zeros((8, 8, 3), bool), ["dtype bool"]),
        (np.full((8, 8, 3), 0.5, np.float32), ["is float", "dtype float32", "uint8"]),
        (np.full((8, 8, 3), np.nan, np.float64), ["NaN or Inf", "uint8"]),
        (np.full((8, 8, 3), np.inf, np.float32), ["NaN or Inf", "uint8"]),
        (np.zeros((0, 8, 3), np.uint8), ["empty", "(0, 8, 3)"]),
        (np.zeros((8, 0, 3), np.uint8), ["empty"]),
    ],
)
def test_bad_arrays(array, fragments):
    error = expect_input_error(array, 6, *fragments)
    assert error.path is None


def test_empty_pil_image():
    expect_input_error(Image.new("RGB", (0, 0)), 2, "empty")


def test_lazily_opened_truncated_pil_image(tmp_path):
    data = png_bytes(Image.fromarray(rng_rgb(64, 64)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as lazy:
        expect_input_error(lazy, 4, "could not be decoded", path=path)


def test_closed_pil_image(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(rng_rgb()).save(path)
    image = Image.open(path)
    image.load()
    image.close()
    expect_input_error(image, 1)


@pytest.mark.parametrize("item", [b"\x89PNG", 42, None, [1, 2, 3], 3.5, {"path": "x.png"}])
def test_unsupported_types(item):
    expect_input_error(item, 8, "unsupported input type")


def test_float_mode_f_is_refused():
    image = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert image.mode == "F"
    expect_input_error(image, 0, "mode F")


def test_mode_i_outside_16_bit_is_refused():
    image = Image.fromarray(np.array([[0, 70000]], np.int32))
    assert image.mode == "I"
    expect_input_error(image, 0, "0..70000")


# ---------------------------------------------------------------------------------------------------------------
# mode conversions
# ---------------------------------------------------------------------------------------------------------------


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_rgba_composited_onto_white():
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128], [200, 100, 0, 64]]], np.uint8)
    out = pixels(load_image(Image.fromarray(rgba, "RGBA"), 0)).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent: white, not the hidden colour
    assert out[0, 1].tolist() == [10, 20, 30]  # opaque: unchanged
    colour, alpha = rgba[0, 2:, :3].astype(float), rgba[0, 2:, 3:].astype(float) / 255
    expected = colour * alpha + 255 * (1 - alpha)
    assert np.abs(out[0, 2:] - expected).max() <= 1


def test_rgba_file_composited_onto_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.fromarray(np.array([[[0, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "RGBA").save(path)
    assert pixels(load_image(path, 0)).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_la_composited_onto_white():
    la = Image.merge("LA", [Image.fromarray(np.array([[50, 50, 50]], np.uint8)),
                            Image.fromarray(np.array([[0, 255, 128]], np.uint8))])  # fmt: skip
    out = pixels(load_image(la, 0)).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [50, 50, 50]
    assert abs(out[0, 2, 0] - (50 * 128 / 255 + 255 * 127 / 255)) <= 1


def test_premultiplied_modes_composited_onto_white():
    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [90, 60, 30, 255]]], np.uint8), "RGBA")
    for mode in ("RGBa", "La"):
        out = pixels(load_image(rgba.convert(mode) if mode == "RGBa" else rgba.convert("LA").convert("La"), 0))
        assert out[0, 0].tolist() == [255, 255, 255]
    assert pixels(load_image(rgba.convert("RGBa"), 0))[0, 1].tolist() == [90, 60, 30]


def palette_image(transparent: int | None) -> Image.Image:
    image = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 200] + [0] * (256 * 3 - 9))
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


def test_palette_colours():
    assert pixels(load_image(palette_image(None), 0)).tolist() == [[[255, 0, 0], [0, 128, 0], [10, 20, 200]]]


def test_palette_transparency_composited_onto_white(tmp_path):
    expected = [[[255, 0, 0], [255, 255, 255], [10, 20, 200]]]
    assert pixels(load_image(palette_image(1), 0)).tolist() == expected
    path = tmp_path / "p.png"
    palette_image(1).save(path, transparency=1)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    assert pixels(load_image(path, 0)).tolist() == expected
    gif = tmp_path / "p.gif"
    palette_image(1).save(gif, transparency=1)
    assert pixels(load_image(gif, 0)).tolist() == expected


def test_grey_l_is_replicated():
    grey = np.array([[0, 7, 128, 255]], np.uint8)
    out = pixels(load_image(Image.fromarray(grey, "L"), 0))
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))


def test_bilevel_mode_1():
    image = Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1")
    assert pixels(load_image(image, 0)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_grey_scaled_by_257(mode, tmp_path):
    values = np.array([0, 128, 129, 256, 32896, 65534, 65535], np.uint16)
    order = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (len(values), 1), values.astype(order).tobytes())
    assert image.mode == mode
    assert np.asarray(image).astype(int).ravel().tolist() == values.tolist()
    expected = [0, 0, 1, 1, 128, 255, 255]
    assert pixels(load_image(image, 0))[0, :, 0].tolist() == expected
    assert pixels(load_image(image, 0))[0, :, 2].tolist() == expected
    if mode == "I;16":  # and a real 16-bit PNG file
        path = tmp_path / "grey16.png"
        image.save(path)
        assert pixels(load_image(path, 0))[0, :, 1].tolist() == expected


def test_mode_i_within_16_bit_range():
    image = Image.fromarray(np.array([[0, 65535, 257]], np.int32))
    assert image.mode == "I"
    assert pixels(load_image(image, 0))[0, :, 0].tolist() == [0, 255, 1]


def test_cmyk_via_pillow(tmp_path):
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK")
    out = pixels(load_image(cmyk, 0))
    assert out.tolist() == [[[255, 255, 255], [255, 0, 255], [0, 0, 0]]]
    path = tmp_path / "cmyk.jpg"
    big = Image.new("CMYK", (16, 16), (0, 255, 0, 0))
    big.save(path, quality=100)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    assert np.abs(pixels(load_image(path, 0)).astype(int) - [255, 0, 255]).max() <= 3


def test_ycbcr_via_pillow():
    ycbcr = Image.fromarray(rng_rgb(4, 4)).convert("YCbCr")
    np.testing.assert_array_equal(pixels(load_image(ycbcr, 0)), np.asarray(ycbcr.convert("RGB")))


def test_exif_orientation_applied(tmp_path):
    array = rng_rgb(6, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # camera rotated: viewers turn it 90 degrees clockwise
    path = tmp_path / "photo.png"
    Image.fromarray(array).save(path, exif=exif)
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == 6
        expected = np.asarray(ImageOps.exif_transpose(check))
    loaded = load_image(path, 0)
    assert loaded.size == (6, 10)
    np.testing.assert_array_equal(pixels(loaded), expected)
    np.testing.assert_array_equal(pixels(loaded), np.rot90(array, k=-1))


def test_multi_frame_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert pixels(load_image(path, 0))[0, 0].tolist() == [255, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# fit_to_tile
# ---------------------------------------------------------------------------------------------------------------


def manual(image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC).crop(box))


@pytest.fixture(scope="module")
def tissue() -> Image.Image:
    if IHC.is_file():
        return load_image(IHC, 0)
    return Image.fromarray(rng_rgb(512, 512))


def test_tile_sized_image_is_unchanged(tissue):
    tile = tissue.crop((0, 0, 224, 224))
    out, changed = fit_to_tile(tile, 224)
    assert out is tile and changed is False


def test_square_256_is_resized(tissue):
    image = tissue.crop((10, 20, 266, 276))
    out, changed = fit_to_tile(image, 224)
    assert changed and out.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(out), manual(image, (224, 224), (0, 0, 224, 224)))


def test_landscape_300x200_resized_then_centre_cropped(tissue):
    image = tissue.crop((0, 0, 300, 200))
    out, changed = fit_to_tile(image, 224)
    assert changed and out.size == (224, 224)
    # short side 200 -> 224, long side 300 -> 336; left = (336 - 224) // 2 = 56
    np.testing.assert_array_equal(np.asarray(out), manual(image, (336, 224), (56, 0, 280, 224)))


def test_portrait_200x300_resized_then_centre_cropped(tissue):
    image = tissue.crop((100, 50, 300, 350))
    out, changed = fit_to_tile(image, 224)
    assert changed and out.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(out), manual(image, (224, 336), (0, 56, 224, 280)))


def test_downscale_512_and_odd_sizes(tissue):
    out, _ = fit_to_tile(tissue, 224)
    np.testing.assert_array_equal(np.asarray(out), manual(tissue, (224, 224), (0, 0, 224, 224)))
    odd = tissue.crop((0, 0, 301, 200))  # long side 301 * 224 / 200 = 337.12 -> 337; left = 56
    np.testing.assert_array_equal(np.asarray(fit_to_tile(odd, 224)[0]), manual(odd, (337, 224), (56, 0, 280, 224)))
    half = tissue.crop((0, 0, 449, 448))  # 449 * 224 / 448 = 224.5 -> 224 (half to even)
    np.testing.assert_array_equal(np.asarray(fit_to_tile(half, 224)[0]), manual(half, (224, 224), (0, 0, 224, 224)))
    up = tissue.crop((0, 0, 100, 60))  # upscaling: 100 * 512 / 60 = 853.33 -> 853; left = (853 - 512) // 2 = 170
    np.testing.assert_array_equal(np.asarray(fit_to_tile(up, 512)[0]), manual(up, (853, 512), (170, 0, 682, 512)))


@pytest.mark.parametrize("bad", [0, -224, 224.0, True, "224"])
def test_fit_to_tile_rejects_bad_tile_sizes(tissue, bad):
    with pytest.raises(ValueError):
        fit_to_tile(tissue, bad)
