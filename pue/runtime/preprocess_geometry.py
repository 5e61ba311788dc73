"""Crop geometry of the image preprocessing: pure functions of sizes, shared by config resolution
(`preprocess_config`) and the preprocessor (`preprocess`). LLaVA-NeXT's grid choice, aspect-preserving fits,
transformers' resize targets, centre-crop windows, and the crop plan of one input size.

Only the standard library is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KINDS = ("anyres", "single")


def select_best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's choice of grid resolution (h, w): most effective pixels, then fewest wasted; first wins ties."""
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_h * pin_w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_h, pin_w), effective, wasted
    if best is None:
        raise ValueError(f"no usable grid resolution among {pinpoints} for a {width}x{height} image")
    return best


def _fit_inside(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size of the image scaled to fit (target_h, target_w) keeping its aspect ratio (rounded up, capped)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def resize_target(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """Output (h, w) of transformers' PIL-backend resize for a size dict."""
    if size.get("shortest_edge") and size.get("longest_edge"):
        return _shortest_longest(height, width, size["shortest_edge"], size["longest_edge"])
    if size.get("shortest_edge"):
        edge = size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (new_long, edge) if width <= height else (edge, new_long)
    return size["height"], size["width"]


def _shortest_longest(height: int, width: int, edge: int, max_size: int) -> tuple[int, int]:
    raw = None
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * edge > max_size:
        raw = max_size * low / high
        edge = int(round(raw))
    if (height <= width and height == edge) or (width <= height and width == edge):
        return height, width
    if width < height:
        return (int(raw * height / width) if raw is not None else int(edge * height / width)), edge
    return edge, (int(raw * width / height) if raw is not None else int(edge * width / height))


def crop_window(source: int, target: int) -> tuple[int, int, int]:
    """Centre crop along one axis: (source start, destination start, length); pads with zeros when short."""
    if source >= target:
        return (source - target) // 2, 0, target
    return 0, math.ceil((target - source) / 2), source


@dataclass(frozen=True)
class Crop:
    """One crop of the anyres layout: a region of the padded grid canvas, or the base image."""

    base: bool
    top: int = 0
    left: int = 0
    height: int = 0
    width: int = 0


@dataclass(frozen=True)
class Plan:
    """Everything about the layout of one input size; computed once per size."""

    grid: tuple[int, int]  # padded grid canvas (h, w); anyres only
    grid_resized: tuple[int, int]  # the image resized into the grid, before padding
    grid_offset: tuple[int, int]  # where it is pasted (top, left)
    base_size: tuple[int, int]
    crops: tuple[Crop, ...]
    crop_size: tuple[int, int]  # every crop after resize / centre crop
    out_size: tuple[int, int]  # the same, or pad_size when a single image is padded to it


def make_plan(kind: str, config: dict[str, Any], height: int, width: int) -> Plan:
    """Lay out the crops of one (height, width) input."""
    size = config["size"]

    def finish(h: int, w: int) -> tuple[int, int]:
        if config["do_resize"]:
            h, w = resize_target(h, w, size)
        if config["do_center_crop"]:
            h, w = config["crop_size"]["height"], config["crop_size"]["width"]
        return h, w

    if kind == "single":
        h, w = height, width
        if config.get("pad_to_square"):
            h = w = max(h, w)
        inner = out = finish(h, w)
        pad = config.get("pad_size") if config["do_pad"] and not config.get("pad_to_square") else None
        if pad is not None:
            if pad["height"] < out[0] or pad["width"] < out[1]:
                raise ValueError(f"pad_size {pad} is smaller than the processed image {out}")
            out = (pad["height"], pad["width"])
        return Plan((0, 0), (0, 0), (0, 0), (0, 0), (Crop(base=True, height=h, width=w),), inner, out)

    if size.get("height") and size.get("width"):
        base_size = (size["height"], size["width"])
    else:
        base_size = (size["shortest_edge"], size["shortest_edge"])
    crop = config["crop_size"]
    if crop and crop.get("height"):
        patch = crop["height"]
    elif size.get("height"):
        patch = size["height"]
    else:
        patch = size["shortest_edge"]
    grid = select_best_resolution(height, width, config["image_grid_pinpoints"])
    resized = _fit_inside(height, width, *grid)
    offset = ((grid[0] - resized[0]) // 2, (grid[1] - resized[1]) // 2)
    crops = [Crop(base=True, height=base_size[0], width=base_size[1])]
    for top in range(0, grid[0], patch):
        for left in range(0, grid[1], patch):
            crops.append(
                Crop(base=False, top=top, left=left, height=min(patch, grid[0] - top), width=min(patch, grid[1] - left))
            )
    outs = {finish(c.height, c.width) for c in crops}
    if len(outs) != 1:
        raise ValueError(f"the crops come out in different sizes {sorted(outs)}; set crop_size or a height/width size")
    out = outs.pop()
    return Plan(grid, resized, offset, base_size, tuple(crops), out, out)
