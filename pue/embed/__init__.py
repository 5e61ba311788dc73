"""The slide job (`pue-embed`): whole slides → one TRIDENT-layout features file per slide, resumable and shareable.

- `inputs`: slide files, folders, globs, CSV → `SlideInput`s.
- `layout`: the output folders (TRIDENT's `<mag>x_<ps>px_<ov>px_overlap/features_<name>/`), locks, run records.
- `pipeline`: the bounded prefetch pipeline (a reader thread overlapping inference).
- `writers`: HDF5 / parquet, atomic and byte-reproducible.
- `locks`: per-slide `O_EXCL` lock files with heartbeat and takeover.
- `records`: one run record per process.
- `slide_plan`: which tiles of a slide, and the attributes describing them (both engines).
- `job`: `SlideJob`, which ties them together (the local engine).
- `ray_engine`, `ray_tasks`: the Ray engine (`--engine ray`): the driver, and what runs on the cluster.
- `watch`: scanner mode.
- `search`, `search_pictures`: a slide asked in words (scores against a query, heatmap, contact sheet).
"""
