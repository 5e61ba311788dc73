"""The pictures of `pue-embed search`: a heatmap of the scores over the slide's thumbnail, and a contact sheet of the
best tiles. Pillow only (no plotting library), written without timestamps so the same search gives the same bytes.

Heatmap: each tile's footprint on the thumbnail takes its score, scaled from the slide's lowest score (0) to its
highest (1): a random-weight model's scores span a narrow range, and only their order within a slide matters to the
picture (the legend prints the real range). Where tiles overlap, the footprint shows their mean. The colour is
blended over the thumbnail; tiles that were not embedded (glass) show the thumbnail alone. The top-k tiles are
outlined and numbered by rank.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pue.embed.search import SearchHits
from pue.slides.readers import SlideReader
from pue.slides.tiling import tile_footprints

__all__ = ["colour_ramp", "contact_sheet", "heatmap"]

# Dark blue → teal → green → yellow: monotonic in lightness, readable over pink H&E.
_RAMP_ANCHORS = np.array([(24, 28, 96), (32, 120, 150), (70, 180, 110), (190, 220, 60), (255, 236, 40)], np.float32)
_BLEND = 0.6
_OUTLINE = (230, 20, 60)
_LEGEND_HEIGHT = 34
_CELL = 192
_CAPTION = 16


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """uint8 RGB (…, 3) for values in [0, 1] (clipped)."""
    clipped = np.clip(np.asarray(values, np.float32), 0.0, 1.0) * (len(_RAMP_ANCHORS) - 1)
    low = np.floor(clipped).astype(np.int64).clip(0, len(_RAMP_ANCHORS) - 2)
    fraction = (clipped - low)[..., None]
    colours = _RAMP_ANCHORS[low] * (1 - fraction) + _RAMP_ANCHORS[low + 1] * fraction
    return np.round(colours).astype(np.uint8)


def heatmap(
    reader: SlideReader,
    coords: np.ndarray,
    extent: int,
    hits: SearchHits,
    query: str,
    max_side: int = 1024,
) -> Image.Image:
    """The slide's thumbnail with each tile coloured by its score, the top tiles outlined, a legend below."""
    thumbnail, scale = reader.thumbnail(max_side)
    base = np.asarray(thumbnail.convert("RGB"), np.float32)
    height, width = base.shape[:2]
    total = np.zeros((height, width), np.float64)
    count = np.zeros((height, width), np.int32)
    low, high = (float(hits.scores.min()), float(hits.scores.max())) if hits.scores.size else (0.0, 0.0)
    span = high - low
    normalised = (hits.scores - low) / span if span > 0 else np.ones_like(hits.scores)
    boxes = _boxes(coords, extent, scale, width, height)
    for (x0, y0, x1, y1), value in zip(boxes, normalised, strict=True):
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    colours = colour_ramp(np.where(covered, total / np.maximum(count, 1), 0.0)).astype(np.float32)
    blended = np.where(covered[..., None], base * (1 - _BLEND) + colours * _BLEND, base)
    image = Image.fromarray(np.round(blended).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for rank, row in enumerate(hits.top, start=1):
        x0, y0, x1, y1 = boxes[row]
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=_OUTLINE, width=2 if x1 - x0 > 8 else 1)
        draw.text((x0 + 2, y0 + 1), str(rank), fill=_OUTLINE, font=font)
    return _with_legend(image, query, low, high, font)


def contact_sheet(
    reader: SlideReader, coords: np.ndarray, extent: int, patch_size: int, hits: SearchHits
) -> Image.Image:
    """The top tiles as the model saw them (read at the features' patch size), best first, captioned."""
    count = len(hits.top)
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    sheet = Image.new("RGB", (columns * _CELL, rows * (_CELL + _CAPTION)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for rank, row in enumerate(hits.top, start=1):
        x, y = int(coords[row, 0]), int(coords[row, 1])
        tile = reader.read(x, y, extent, patch_size).resize((_CELL, _CELL), Image.Resampling.LANCZOS)
        left, top = ((rank - 1) % columns) * _CELL, ((rank - 1) // columns) * (_CELL + _CAPTION)
        sheet.paste(tile, (left, top))
        caption = f"#{rank} {float(hits.scores[row]):.4f} ({x},{y})"
        draw.text((left + 3, top + _CELL + 2), caption, fill=(0, 0, 0), font=font)
    return sheet


def _boxes(coords: np.ndarray, extent: int, scale: float, width: int, height: int) -> list[tuple[int, int, int, int]]:
    x0, y0, x1, y1 = (array.tolist() for array in tile_footprints(coords, extent, scale, width, height))
    return list(zip(x0, y0, x1, y1, strict=True))


def _with_legend(image: Image.Image, query: str, low: float, high: float, font: ImageFont.ImageFont) -> Image.Image:
    """`image` with a strip below: the colour ramp from the lowest to the highest score, and the query."""
    width = image.width
    framed = Image.new("RGB", (width, image.height + _LEGEND_HEIGHT), (255, 255, 255))
    framed.paste(image, (0, 0))
    bar_width = max(16, min(200, width // 3))
    ramp = colour_ramp(np.linspace(0.0, 1.0, bar_width))[None, :, :].repeat(10, axis=0)
    framed.paste(Image.fromarray(ramp), (4, image.height + 4))
    draw = ImageDraw.Draw(framed)
    draw.text((4, image.height + 17), f"{low:.4f}", fill=(0, 0, 0), font=font)
    draw.text((max(4, bar_width - 36), image.height + 17), f"{high:.4f}", fill=(0, 0, 0), font=font)
    text, room = f"cosine to {query}", width - bar_width - 18
    label, cut = text, len(text)
    while cut > 0 and draw.textlength(label, font=font) > room:  # shortened to fit the picture's width
        cut -= 1
        label = text[:cut] + "..."
    draw.text((bar_width + 14, image.height + 8), label, fill=(0, 0, 0), font=font)
    return framed
