"""The slide job (`pue-embed`): whole slides → one TRIDENT-layout features file per slide, resumable and shareable.

- `inputs`: slide files, folders, globs, CSV → `SlideInput`s.
- `layout`: the output folders (TRIDENT's `<mag>x_<ps>px_<ov>px_overlap/features_<name>/`), locks, run records.
- `pipeline`: the bounded prefetch pipeline (a reader thread overlapping inference).
- `writers`: HDF5 / parquet, atomic and byte-reproducible.
- `locks`: per-slide `O_EXCL` lock files with heartbeat and takeover.
- `records`: one run record per process.
- `job`: `SlideJob`, which ties them together.
- `watch`: scanner mode.
- `search`, `search_pictures`: a slide asked in words (scores against a query, heatmap, contact sheet).
"""
