"""Calibration patches from slides: Pillow's reader on the shared sample slide and on written TIFFs (metadata,
magnification, glass, corrupt files), openslide on the sample slide and on a fake pyramid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from patch_images import image_folder, tissue_image
from PIL import Image

from pue.calibration.sampling import sample_patches
from pue.calibration.slide_source import SlideSource
from pue.calibration.sources import FolderSource, Patch, open_sources
from pue.errors import PueError
from pue.slides.tissue import is_tissue

SLIDE = Path(__file__).resolve().parents[3] / "shared" / "data" / "cmu_small_region.svs"
needs_slide = pytest.mark.skipif(not SLIDE.is_file(), reason=f"sample slide {SLIDE} not present")

try:
    import openslide  # noqa: F401

    HAVE_OPENSLIDE = True
except (ImportError, OSError):
    HAVE_OPENSLIDE = False


@pytest.fixture(scope="module")
def slide_native() -> SlideSource:
    source = SlideSource(SLIDE, patch_size=224, reader="pillow")
    source.candidates()
    return source


@needs_slide
def test_slide_native_tiles_are_tissue_on_the_grid(slide_native: SlideSource) -> None:
    patches = slide_native.candidates()
    info = slide_native.describe()
    assert len(patches) >= 30  # measured 45 of 117 grid tiles
    assert info["grid_tiles"] == (2220 // 224) * (2967 // 224)
    assert info["extent"] == 224 and info["downsample"] == 1.0 and info["native_mpp"] == pytest.approx(0.499)
    assert all(p.x % 224 == 0 and p.y % 224 == 0 for p in patches)
    assert all(p.size == 224 and p.extent == 224 and p.mpp == pytest.approx(0.499) for p in patches)
    assert patches == sorted(patches, key=lambda p: (p.y, p.x))
    chosen, summary = sample_patches([slide_native], 16, seed=0)
    with Image.open(SLIDE) as whole:
        level0 = np.asarray(whole.convert("RGB"))
    for patch in chosen:
        tile = patch.load()
        assert tile.size == (224, 224) and tile.mode == "RGB"
        assert is_tissue(tile), (patch.x, patch.y)
        assert np.array_equal(np.asarray(tile), level0[patch.y : patch.y + 224, patch.x : patch.x + 224])
    # a patch rebuilt from calibration.json (no open reader) loads the same pixels (any JPEG decoder)
    rebuilt = Patch(**chosen[0].to_dict())
    assert rebuilt == chosen[0]
    difference = np.asarray(rebuilt.load(), dtype=int) - np.asarray(chosen[0].load(), dtype=int)
    assert np.abs(difference).mean() < 2
    assert summary["sources"][0]["kind"] == "slide" and summary["sources"][0]["used"] == 16


@needs_slide
def test_glass_tiles_are_left_out(slide_native: SlideSource) -> None:
    kept = {(p.x, p.y) for p in slide_native.candidates()}
    reader = slide_native.reader
    glass = [
        (x, y)
        for y in range(0, 2967 - 223, 224)
        for x in range(0, 2220 - 223, 224)
        if not is_tissue(reader.read(x, y, 224, 224))
    ]
    assert glass and not kept & set(glass)
    assert (0, 0) in glass  # the left margin is glass


@needs_slide
def test_slide_at_10x_reads_twice_the_area() -> None:
    source = SlideSource(SLIDE, patch_size=224, magnification=10)
    patches = source.candidates()
    assert source.extent == 448 and source.downsample == pytest.approx(2.0)
    assert len(patches) >= 6  # measured 10 of 24
    assert all(p.x % 448 == 0 and p.y % 448 == 0 and p.extent == 448 for p in patches)
    assert all(p.size == 224 and p.mpp == pytest.approx(0.998) for p in patches)
    for patch in patches[:4]:
        tile = patch.load()
        assert tile.size == (224, 224) and is_tissue(tile)
    # 0.5 µm/px is the scan's own resolution (within 10 %): native tiles
    assert SlideSource(SLIDE, mpp=0.5).extent == 224
    assert SlideSource(SLIDE, magnification=20).extent == 224


@needs_slide
def test_slide_resolution_and_reader_errors() -> None:
    with pytest.raises(PueError, match="upsampling"):
        SlideSource(SLIDE, magnification=40)
    with pytest.raises(PueError, match="not both"):
        SlideSource(SLIDE, magnification=10, mpp=1.0)
    with pytest.raises(PueError, match="positive"):
        SlideSource(SLIDE, mpp=0)
    with pytest.raises(PueError, match="unknown slide reader"):
        SlideSource(SLIDE, reader="vips")
    if not HAVE_OPENSLIDE:
        with pytest.raises(PueError, match=r"pue\[slides\]"):
            SlideSource(SLIDE, reader="openslide")


@needs_slide
def test_open_sources_dispatches_on_suffix(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "patches", 2)
    sources = open_sources([folder, SLIDE], patch_size=224, magnification=10)
    assert [type(s) for s in sources] == [FolderSource, SlideSource]
    assert sources[1].extent == 448


def test_background_only_slide_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "glass.tif"
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(238, 3, (700, 900, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(glass).save(path)
    source = open_sources([path])[0]
    assert isinstance(source, SlideSource)
    with pytest.raises(PueError) as info:
        source.candidates()
    message = str(info.value)
    assert "no tissue found" in message and str(path) in message
    assert "saturation threshold 0.040" in message and "tissue fraction >= 0.5" in message


def test_corrupt_slide_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.svs"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(PueError, match="corrupt") as info:
        open_sources([path])
    assert str(path) in str(info.value)


def test_synthetic_slide_metadata_and_magnification(tmp_path: Path) -> None:
    """An Aperio-style description (40x, 0.25 µm/px) read by Pillow; 20x tiles cover 2x the level-0 pixels."""
    rgb = np.full((600, 900, 3), 240, dtype=np.uint8)
    rgb[150:450, 200:650] = np.asarray(tissue_image(1, 450))[:300]  # grid tiles of 200: two wholly inside
    path = tmp_path / "synthetic.tif"
    Image.fromarray(rgb).save(path, description="Aperio Image Library v1 |AppMag = 40|MPP = 0.25")
    source = SlideSource(path, patch_size=100, magnification=20)
    assert (source.reader.magnification, source.reader.mpp) == (40.0, 0.25)
    assert source.extent == 200 and source.patch_mpp == pytest.approx(0.5)
    patches = source.candidates()
    assert {(p.x, p.y) for p in patches} == {(200, 200), (400, 200)}  # wholly inside the tissue block
    assert all(p.load().size == (100, 100) for p in patches)
    # by µm/px the same
    assert SlideSource(path, patch_size=100, mpp=0.5).extent == 200


def test_slide_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.tiff"
    tissue_image(2, 300).save(path)
    with pytest.raises(PueError, match="neither its µm/px nor its magnification"):
        SlideSource(path, magnification=20)
    native = SlideSource(path, patch_size=128)
    assert native.reader.mpp is None
    assert len(native.candidates()) == 4 and native.candidates()[0].mpp is None
    with pytest.raises(PueError, match="smaller than one tile"):
        SlideSource(path, patch_size=512).candidates()


def test_tiff_resolution_tags_give_mpp(tmp_path: Path) -> None:
    path = tmp_path / "res.tif"
    tissue_image(3, 256).save(path, resolution_unit="cm", x_resolution=20000.0, y_resolution=20000.0)
    assert SlideSource(path).reader.mpp == pytest.approx(0.5)
    path72 = tmp_path / "screen.tif"
    tissue_image(3, 256).save(path72, dpi=(72, 72))
    assert SlideSource(path72).reader.mpp is None  # a screen default, not a scan resolution


@pytest.mark.skipif(
    not HAVE_OPENSLIDE and os.environ.get("PUE_REQUIRE_SLIDES") != "1",  # under .ci/run a missing openslide fails
    reason="openslide not installed (pip install 'pue[slides]')",
)
@needs_slide
def test_openslide_reads_the_same_tiles(slide_native: SlideSource) -> None:
    source = SlideSource(SLIDE, patch_size=224, magnification=10, reader="openslide")
    assert source.reader.backend == "openslide"
    assert source.reader.mpp == pytest.approx(0.499) and source.reader.magnification == 20.0
    native = SlideSource(SLIDE, patch_size=224, reader="openslide")
    patches = native.candidates()
    pillow = {(p.x, p.y) for p in slide_native.candidates()}
    ours = {(p.x, p.y) for p in patches}
    assert len(ours ^ pillow) <= 2  # the same tissue tiles, up to JPEG decoder differences at the margin
    tile = patches[0].load()
    reference = slide_native.reader.read(patches[0].x, patches[0].y, 224, 224)
    assert np.abs(np.asarray(tile, dtype=int) - np.asarray(reference, dtype=int)).mean() < 2
    assert all(p.size == 224 for p in source.candidates())


class _FakeOpenSlide:
    """Just enough of openslide.OpenSlide: a 40x pyramid (1, 4, 16) with tissue in one rectangle and an
    unscanned (transparent) band on the left, as openslide returns it for sparse slides."""

    dimensions = (8000, 6000)
    level_downsamples = (1.0, 4.0, 16.0)
    properties = {"openslide.mpp-x": "0.2500", "openslide.objective-power": "40"}
    tissue = (1792, 1792, 5376, 4480)  # level-0 rectangle, on the 896-px grid of 224 px at 10x
    unscanned = 600  # x below this is transparent

    def __init__(self) -> None:
        self.reads: list[tuple[int, tuple[int, int]]] = []

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return max(i for i, ds in enumerate(self.level_downsamples) if ds <= max(downsample, 1.0))

    def _render(self, x: int, y: int, ds: float, size: tuple[int, int]) -> Image.Image:
        xs = x + np.arange(size[0]) * ds
        ys = y + np.arange(size[1]) * ds
        x0, y0, x1, y1 = self.tissue
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        rgba = np.empty((size[1], size[0], 4), dtype=np.uint8)
        rgba[:] = (240, 240, 240, 255)
        rgba[inside] = (190, 90, 170, 255)
        rgba[:, xs < self.unscanned] = 0
        return Image.fromarray(rgba, "RGBA")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        self.reads.append((level, size))
        return self._render(location[0], location[1], self.level_downsamples[level], size)

    def get_thumbnail(self, size: tuple[int, int]) -> Image.Image:
        scale = max(self.dimensions[0] / size[0], self.dimensions[1] / size[1])
        thumb_size = (round(self.dimensions[0] / scale), round(self.dimensions[1] / scale))
        white = Image.new("RGBA", thumb_size, (255, 255, 255, 255))
        return Image.alpha_composite(white, self._render(0, 0, scale, thumb_size)).convert("RGB")


def test_openslide_reader_picks_the_level_and_resizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The openslide code path on a fake pyramid: level choice, region size, alpha onto white, grid, metadata."""
    from pue.slides import readers as slides

    fake = _FakeOpenSlide()
    path = tmp_path / "fake.svs"
    path.write_bytes(b"")
    monkeypatch.setattr(slides, "open_slide", lambda p, reader="auto": slides.OpenSlideReader(p, fake))

    at10 = SlideSource(path, patch_size=224, magnification=10)  # 40x -> 10x: downsample 4, level 1, no resize
    assert (at10.reader.mpp, at10.reader.magnification) == (0.25, 40.0)
    assert at10.extent == 896 and at10.patch_mpp == pytest.approx(1.0)
    patches = at10.candidates()
    assert {(p.x, p.y) for p in patches} == {(x, y) for x in (1792, 2688, 3584, 4480) for y in (1792, 2688, 3584)}
    assert all(p.level == 1 and p.extent == 896 for p in patches)
    assert set(fake.reads) == {(1, (224, 224))}
    assert np.asarray(patches[0].load())[0, 0].tolist() == [190, 90, 170]

    fake.reads.clear()
    at5 = SlideSource(path, patch_size=224, mpp=2.0)  # downsample 8: read 448 px at level 1, resized to 224
    tile = at5.reader.read(0, 0, at5.extent, 224)
    assert fake.reads == [(1, (448, 448))] and tile.size == (224, 224) and tile.mode == "RGB"
    assert np.asarray(tile)[:, :10].min() == 255  # the unscanned band is white, not black

    capped = SlideSource(path, patch_size=224, magnification=10, max_tiles=5)
    assert len(capped.candidates()) == 5 and capped.describe()["checked_tiles"] == 5
