"""The slide job's picture: tissue tinted, embedded tiles outlined (or filled when tiny), bounded size, written
atomically and reproducibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pue.slides.thumbnails import TILE_COLOUR, render_tiles_overview, write_png_atomically


def grey_thumbnail(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), 200, np.uint8))


def test_tiles_are_outlined_where_they_lie_and_tissue_is_tinted() -> None:
    thumbnail = grey_thumbnail(100, 80)  # 0.1 thumbnail px per level-0 px: a 1000 x 800 slide
    mask = np.zeros((80, 100), bool)
    mask[40:, :50] = True
    picture = np.asarray(render_tiles_overview(thumbnail, 0.1, np.array([[500, 0]]), 200, mask))
    assert picture.shape == (80, 100, 3)
    # the tile spans thumbnail pixels 50..69 x 0..19: its border is the tile colour, its inside untouched
    assert tuple(picture[0, 55]) == TILE_COLOUR and tuple(picture[19, 69]) == TILE_COLOUR
    assert tuple(picture[10, 60]) == (200, 200, 200)
    # tissue pixels are tinted towards green, glass pixels are not
    assert picture[60, 10, 1] > picture[60, 10, 0] and tuple(picture[10, 10]) == (200, 200, 200)


def test_a_large_slide_is_shrunk_and_tiny_tiles_are_filled() -> None:
    thumbnail = grey_thumbnail(4000, 1000)
    coords = np.array([[x, 0] for x in range(0, 40000, 100)])  # 400 tiles of 100 level-0 px, 1 px each shown
    picture = np.asarray(render_tiles_overview(thumbnail, 0.1, coords, 100, max_side=400))
    assert picture.shape == (100, 400, 3)
    row = picture[0]
    assert all(tuple(pixel) == TILE_COLOUR for pixel in row)  # every tiny tile filled: the whole top row


def test_written_atomically_and_byte_identical(tmp_path: Path) -> None:
    picture = render_tiles_overview(grey_thumbnail(64, 48), 0.5, np.array([[0, 0], [40, 30]]), 32)
    first, second = tmp_path / "a" / "s.png", tmp_path / "b" / "s.png"
    write_png_atomically(picture, first)
    write_png_atomically(picture, second)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["s.png"]  # no temporary file left
