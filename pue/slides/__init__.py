"""Whole-slide reading and tiling, with no onnx and no torch: the slide job and calibration both use it.

- `readers`: `open_slide` (openslide from the `slides` extra, else Pillow), regions at the best pyramid level.
- `resolution`: a magnification or µm/px target → `TileGeometry` (the level-0 square of a tile, stride, level).
- `tissue`: the tissue filter (Otsu on HSV saturation, clipped).
- `tiling`: the grid over level 0 and the tissue rule that keeps tiles (`tissue_tiles`).
- `coords_files`: TRIDENT's and CLAM's patch-coordinate files (`--coords-from`).
"""
