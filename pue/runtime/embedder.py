"""`Embedder`: images, texts and composed queries → unit vectors, from any bundle, without torch."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pue.bundle import Manifest, read_manifest, verify_files
from pue.errors import BundleError, InputError, PueError
from pue.runtime.backends.base import decoder_output_width
from pue.runtime.backends.registry import open_backend
from pue.runtime.images import fit_to_tile, load_image, load_tiles
from pue.runtime.preprocess import ImagePreprocessor
from pue.runtime.prompts import PromptTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """One row: images alone, a text alone, or both (a composed query).

    `image=` holds one image, `images=` several (k ≥ 1, kept in order: the prompt holds their placeholders in
    that order); give one or the other. Every image follows the tile-size policy on its own.
    """

    image: Any = None
    text: str | None = None
    images: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        if self.images is not None:
            if self.image is not None:
                raise InputError("a query takes image= or images=, not both")
            if isinstance(self.images, (str, bytes, Path)) or (
                isinstance(self.images, np.ndarray) and self.images.ndim == 3
            ):
                raise InputError(
                    f"images= must be a sequence of images, got a single {type(self.images).__name__}",
                    hint="wrap it in a list, or pass it as image=",
                )
            object.__setattr__(self, "images", tuple(self.images))
            if not self.images:
                raise InputError("images= is empty", hint="give at least one image, or leave images= out")

    @property
    def image_list(self) -> list[Any]:
        """The row's images in order (empty for a text)."""
        if self.images is not None:
            return list(self.images)
        return [] if self.image is None else [self.image]

    @property
    def kind(self) -> str:
        has_images = self.image is not None or self.images is not None
        if has_images and self.text is not None:
            return "composed"
        if has_images:
            return "image"
        if self.text is not None:
            return "text"
        raise InputError("a query needs an image, a text, or both")


class Embedder:
    """Embeds from a bundle with the backend the registry chose. Every bad item raises a PueError naming it."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Any, batch_size: int | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.batch_size = int(batch_size or manifest.default_batch_size)
        if self.batch_size < 1:
            raise PueError(f"batch_size must be at least 1, got {self.batch_size}")
        width = decoder_output_width(manifest)
        if manifest.embedding_dim > width or (
            manifest.embedding_dim < width and not (manifest.recipe or {}).get("matryoshka")
        ):
            raise BundleError(
                f"the bundle's embedding_dim {manifest.embedding_dim} differs from its decoder's output width {width}, "
                "and its recipe allows no Matryoshka cut to it",
                "rebuild the bundle with pue-export onnx",
            )
        self.preprocessor = ImagePreprocessor(manifest.preprocessing)
        self.prompts = PromptTokenizer.for_bundle(bundle_dir, manifest)
        self.stage_seconds: dict[str, float] = {"load": 0.0, "preprocess": 0.0, "tokenize": 0.0}
        self.backend_name = getattr(backend, "name", type(backend).__name__)
        self.closed = False

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str = "auto",
        device: str = "cpu",
        batch_size: int | None = None,
        verify_hashes: bool = True,
        threads: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Embedder:
        """Open a bundle: manifest and format checked, every file inside the bundle and matching its sha256
        (`verify_hashes=False` skips hashing for very large bundles, and says so in the log).

        `backend` is "auto" (the first registered backend that runs this bundle on `device` and is installed) or a
        registered name (`pue.runtime.backends.registry`); a bundle it cannot run is refused with the reason and the
        backends that can. `options` pass through to the backend (e.g. onnxruntime's `session_options`,
        `profile_dir`); `threads` goes to backends that run on CPU threads. Close it (`close()`, or `with
        Embedder.load(...) as emb:`) to release sessions and device memory at once.
        """
        bundle_dir = Path(path)
        manifest = read_manifest(bundle_dir)
        verify_files(bundle_dir, manifest, check_hashes=verify_hashes)
        spec, runner = open_backend(bundle_dir, manifest, backend, device, options=options, threads=threads)
        try:
            embedder = cls(bundle_dir, manifest, runner, batch_size)
        except BaseException:
            runner.close()
            raise
        embedder.backend_name = spec.name
        return embedder

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the backend's sessions or engines and their device memory; a second call does nothing."""
        if not self.closed:
            self.closed = True
            self.backend.close()

    @property
    def takes_image_sets(self) -> bool:
        """Whether rows may hold several images (bundles of format 1.2 whose chat template renders them)."""
        return self.manifest.prompts.image_separator is not None

    @property
    def max_images_per_row(self) -> int:
        """The most images one image row can hold within the bundle's max_seq_len (1 without image sets)."""
        return self.prompts.max_images()

    @property
    def dimension(self) -> int:
        return int(self.manifest.embedding_dim)

    # --- public API -------------------------------------------------------------------------------------
    def embed_images(self, images: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        """Paths, PIL images or H×W×3 uint8 arrays → float32 (N, D) unit vectors, in input order."""
        return self.embed([Query(image=image) for image in _as_list(images, "images")], batch_size=batch_size)

    def embed_image_sets(self, image_sets: Sequence[Sequence[Any]], batch_size: int | None = None) -> np.ndarray:
        """One vector per set of images (a region's tiles, a stain pair, a case): float32 (N, D) unit vectors.

        Each set's images go into one prompt, in order; sets may differ in size.
        """
        return self.embed(
            [Query(images=_as_list(images, f"image set {i}")) for i, images in enumerate(_as_list(image_sets, "sets"))],
            batch_size=batch_size,
        )

    def embed_texts(self, texts: Sequence[str], truncate: bool = True, batch_size: int | None = None) -> np.ndarray:
        items = _as_list(texts, "texts")
        for index, text in enumerate(items):
            _check_text(text, index)
        return self.embed([Query(text=text) for text in items], truncate=truncate, batch_size=batch_size)

    def embed_composed(
        self, images: Sequence[Any], texts: Sequence[str], truncate: bool = True, batch_size: int | None = None
    ) -> np.ndarray:
        image_list, text_list = _as_list(images, "images"), _as_list(texts, "texts")
        if len(image_list) != len(text_list):
            raise InputError(
                f"embed_composed needs one text per image (got {len(image_list)} images, {len(text_list)} texts)"
            )
        for index, text in enumerate(text_list):
            _check_text(text, index)
        queries = [Query(image=image, text=text) for image, text in zip(image_list, text_list, strict=True)]
        return self.embed(queries, truncate=truncate, batch_size=batch_size)

    def embed(self, queries: Sequence[Query], truncate: bool = True, batch_size: int | None = None) -> np.ndarray:
        """Any mix of image, text and composed rows; they may share a batch."""
        self._require_open()
        queries = list(queries)
        if not queries:
            return np.zeros((0, self.dimension), np.float32)
        started = time.perf_counter()
        token_rows, truncated = [], []
        for index, query in enumerate(queries):
            kind = query.kind
            ids, was_truncated = self.prompts.encode(
                kind, query.text, index=index, truncate=truncate, images=len(query.image_list)
            )
            token_rows.append(ids)
            if was_truncated:
                truncated.append(index)
        self.prompts.warn_truncated(truncated, len(queries))
        self.stage_seconds["tokenize"] += time.perf_counter() - started
        size = int(batch_size or self.batch_size)
        # Batch rows of similar length together (less padding), then restore the caller's order.
        order = sorted(range(len(queries)), key=lambda i: len(token_rows[i]))
        output = np.empty((len(queries), self.dimension), np.float32)
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            output[chunk] = self._run_batch([queries[i] for i in chunk], [token_rows[i] for i in chunk], chunk)
        return output

    def pixel_values(self, images: Sequence[Any], first_index: int = 0) -> np.ndarray:
        """Preprocessed pixels as `vision.onnx` takes them (the tile-size policy, README `--tile-size`, first)."""
        started = time.perf_counter()
        pixels = self.preprocessor(load_tiles(images, self.manifest.tile_size, first_index))
        self.stage_seconds["preprocess"] += time.perf_counter() - started
        return pixels

    def embed_pixel_values(self, pixels: np.ndarray) -> np.ndarray:
        """Image rows from `pixel_values(...)`'s output, as one batch: the same vectors `embed_images` gives those
        images in a batch of this size. Lets a caller preprocess on another thread while this one runs the graphs."""
        self._require_open()
        rows = int(pixels.shape[0])
        if rows == 0:
            return np.zeros((0, self.dimension), np.float32)
        ids, _ = self.prompts.encode("image", None)
        input_ids, attention_mask = self.prompts.pad([ids] * rows)
        return self._output(self.backend.run(input_ids, attention_mask, pixels, np.arange(rows, dtype=np.int64)))

    def image_features(self, images: Sequence[Any]) -> np.ndarray:
        """`vision.onnx`'s output for these images (used by the parity gate and calibration)."""
        return self.vision_outputs(images)["image_features"]

    def vision_outputs(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Every output of `vision.onnx` for these images, by name (`image_features`; Qwen3-VL adds
        `deepstack_features`)."""
        self._require_open()
        outputs: dict[str, list[np.ndarray]] = {}
        items = list(images)
        for start in range(0, len(items), self.batch_size):
            pixels = self.pixel_values(items[start : start + self.batch_size], first_index=start)
            for name, value in self.backend.vision.infer({"pixel_values": pixels}).items():
                outputs.setdefault(name, []).append(value)
        if not outputs:
            return {
                "image_features": np.zeros((0, self.manifest.tokens_per_image, self.manifest.hidden_size), np.float32)
            }
        return {name: np.concatenate(values) for name, values in outputs.items()}

    def stage_times(self) -> dict[str, float]:
        """Cumulative seconds per stage: preprocess, tokenize, and the backend's vision and decoder."""
        return {**self.stage_seconds, **self.backend.stage_times()}

    # --- internals --------------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self.closed:
            raise PueError(f"the Embedder of {self.bundle_dir} was closed", "load the bundle again to embed with it")

    def _run_batch(self, queries: list[Query], rows: list[list[int]], indices: list[int]) -> np.ndarray:
        image_rows: list[int] = []  # one entry per image: the batch row it belongs to (a row's images in order)
        tiles = []
        started = time.perf_counter()
        for row, query in enumerate(queries):
            for image in query.image_list:
                tile, _ = fit_to_tile(load_image(image, indices[row]), self.manifest.tile_size)
                tiles.append(tile)
                image_rows.append(row)
        pixels = None
        if tiles:
            pixels = self.preprocessor(tiles)
            self.stage_seconds["preprocess"] += time.perf_counter() - started
        input_ids, attention_mask = self.prompts.pad(rows)
        return self._output(self.backend.run(input_ids, attention_mask, pixels, np.asarray(image_rows, dtype=np.int64)))

    def _output(self, embeddings: np.ndarray) -> np.ndarray:
        """The graph's unit vectors, cut to the bundle's `embedding_dim` and renormalised where the recipe allows
        it (Matryoshka; checked at load); unchanged otherwise."""
        return matryoshka_cut(embeddings, self.dimension)


def matryoshka_cut(embeddings: np.ndarray, dimension: int) -> np.ndarray:
    """The first `dimension` values of each row, renormalised to unit length (rows already that wide unchanged)."""
    if embeddings.shape[-1] <= dimension:
        return embeddings
    cut = embeddings[..., :dimension]
    norms = np.maximum(np.linalg.norm(cut, axis=-1, keepdims=True), 1e-12)
    return (cut / norms).astype(np.float32)


def _as_list(items: Any, what: str) -> list[Any]:
    if isinstance(items, (str, bytes)) or (isinstance(items, np.ndarray) and items.ndim == 3):
        raise InputError(
            f"{what} must be a sequence of items, got a single {type(items).__name__}", hint="wrap it in a list"
        )
    return list(items)


def _check_text(text: Any, index: int) -> None:
    if not isinstance(text, str):
        raise InputError(f"expected a str, got {type(text).__name__}", index=index)
