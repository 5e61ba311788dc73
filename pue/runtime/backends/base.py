"""The runner contract every backend follows (one runner per graph or engine) and the two-graph `Backend`.

A `Runner` is activated (as a context manager or with `activate()`), describes its inputs and outputs,
checks every feed against that description before dispatching it, and records its own inference time.
A `Backend` holds the bundle's two runners, `vision` and `decoder`, and turns one tokenized batch (plus
the pixel values of the rows that carry an image) into sentence embeddings.
"""

from __future__ import annotations

import abc
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pue.bundle import Manifest, TensorSpec
from pue.errors import PueError

# Names fixed by the graph contract (README "Bundle", docs/architecture.md).
PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
SENTENCE_EMBEDDING = "sentence_embedding"

VALID_DEVICES = '"cpu", "cuda" or "cuda:N" (N the GPU index, e.g. "cuda:1")'
_DEVICE_PATTERN = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """A parsed device string: `kind` is "cpu" or "cuda"; `index` is the GPU index (None on CPU)."""

    kind: str
    index: int | None = None

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(device: str | Device) -> Device:
    """Parse "cpu", "cuda" (GPU 0) or "cuda:N"; anything else is refused with the valid forms."""
    if isinstance(device, Device):
        return device
    match = _DEVICE_PATTERN.match(device) if isinstance(device, str) else None
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise PueError(f"unknown device {device!r}", f"use {VALID_DEVICES}")
    if match.group(1) == "cpu":
        return Device("cpu")
    return Device("cuda", int(match.group(2) or 0))


@dataclass(frozen=True)
class FeedValue:
    """What the input check needs to know about a value: host arrays and device-resident values alike."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, value: Any) -> FeedValue:
        return cls(np.dtype(value.dtype), tuple(int(d) for d in value.shape))


def check_feed(runner_name: str, feed: Mapping[str, FeedValue], expected: list[TensorSpec]) -> None:
    """Refuse a feed whose names, dtypes, ranks or fixed dimensions differ from `expected`, before dispatch."""
    expected_names = [spec.name for spec in expected]
    missing = [name for name in expected_names if name not in feed]
    unexpected = [name for name in feed if name not in expected_names]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        raise PueError(
            f"{runner_name}: the feed does not match the graph's inputs ({'; '.join(parts)})",
            f"the graph takes {expected_names}",
        )
    for spec in expected:
        value = feed[spec.name]
        if value.dtype != _numpy_dtype(spec.dtype):
            raise PueError(
                f"{runner_name}: input '{spec.name}' has dtype {value.dtype}, the graph expects {spec.dtype}",
                f"cast it with .astype(np.{spec.dtype})",
            )
        if len(value.shape) != len(spec.shape):
            raise PueError(
                f"{runner_name}: input '{spec.name}' has shape {list(value.shape)} (rank {len(value.shape)}), "
                f"the graph expects rank {len(spec.shape)} {list(spec.shape)}"
            )
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape, strict=True)):
            if isinstance(want, int) and want > 0 and got != want:
                raise PueError(
                    f"{runner_name}: input '{spec.name}' has shape {list(value.shape)}, the graph expects "
                    f"{list(spec.shape)} (dimension {axis} is fixed at {want})"
                )


def _numpy_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # a type numpy lacks (e.g. bfloat16): nothing numpy can feed matches it
        return None


class Runner(abc.ABC):
    """One graph or engine. Use it as a context manager; `infer` checks the feed, then times the run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False
        self.last_inference_time = 0.0
        self.total_inference_time = 0.0
        self.inference_count = 0
        self._inputs: list[TensorSpec] = []  # set by `_activate`, in graph order
        self._outputs: list[TensorSpec] = []

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load the graph or engine (allocating its memory); a second call does nothing."""
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        """Free what `activate` loaded; a runner that is not active is left alone."""
        if self.is_active:
            self._deactivate()
            self.is_active = False

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    def input_metadata(self) -> list[TensorSpec]:
        """Inputs in graph order; dynamic dimensions are strings."""
        self._require_active()
        return list(self._inputs)

    def output_metadata(self) -> list[TensorSpec]:
        """Outputs in graph order; dynamic dimensions are strings."""
        self._require_active()
        return list(self._outputs)

    @abc.abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check `feed` against `input_metadata()`, run it, and record the time the run took."""
        self._require_active()
        bad = [name for name, value in feed.items() if not isinstance(value, np.ndarray)]
        if bad:
            raise PueError(f"{self.name}: inputs {bad} are not numpy arrays", "pass np.ndarray values")
        check_feed(self.name, {name: FeedValue.of(value) for name, value in feed.items()}, self.input_metadata())
        start = time.perf_counter()
        outputs = self._infer(feed)
        self._record_time(time.perf_counter() - start)
        return outputs

    def _require_active(self) -> None:
        if not self.is_active:
            raise PueError(f"runner '{self.name}' is not active", "use it as `with runner:` or call activate() first")

    def _record_time(self, seconds: float) -> None:
        self.last_inference_time = seconds
        self.total_inference_time += seconds
        self.inference_count += 1


class Backend(abc.ABC):
    """The two graphs of a bundle. Subclasses create and activate `vision` and `decoder` in `__init__`.

    A backend is registered by name with what it runs in `pue.runtime.backends.registry`; `close()` (or leaving a
    `with` block) releases both runners, and a second call does nothing.
    """

    name = "backend"  # the registry's name for it
    vision: Runner
    decoder: Runner

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release both runners (sessions, engines, device memory)."""
        for runner in (getattr(self, "vision", None), getattr(self, "decoder", None)):
            if runner is not None:
                runner.deactivate()

    def stage_times(self) -> dict[str, float]:
        """Cumulative seconds spent in each stage since the backend was created."""
        return {"vision": self.vision.total_inference_time, "decoder": self.decoder.total_inference_time}

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pixel_values: np.ndarray | None,
        image_rows: np.ndarray,
    ) -> np.ndarray:
        """Sentence embeddings float32 [B, D] of one tokenized batch.

        `pixel_values` holds one entry per image of the batch and `image_rows` the row each belongs to
        (non-decreasing: a row's images consecutive, in prompt order); `pixel_values` is None when no row has an
        image. A row of k images carries k × tokens_per_image image tokens; rows without any get zero features.
        """
        image_rows = self._check_batch(input_ids, attention_mask, pixel_values, image_rows)
        return self._run_checked(input_ids, attention_mask, pixel_values, image_rows)

    def _run_checked(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pixel_values: np.ndarray | None,
        image_rows: np.ndarray,
    ) -> np.ndarray:
        """The host path: vision on all images, each row's features placed one image after another, decoder."""
        vision_outputs = None
        if len(image_rows):
            pixel_values = pixel_values.astype(self._input_dtype(self.vision, PIXEL_VALUES), copy=False)
            vision_outputs = self.vision.infer({PIXEL_VALUES: pixel_values})
        feed = decoder_feed(
            self.decoder.input_metadata(), input_ids, attention_mask, vision_outputs, image_rows, self.hidden_size()
        )
        outputs = self.decoder.infer(feed)
        return np.asarray(outputs[SENTENCE_EMBEDDING], dtype=np.float32)

    def hidden_size(self) -> int:
        """The last dimension of the decoder's `image_features` (from the graph when fixed there)."""
        for spec in self.decoder.input_metadata():
            if spec.name == IMAGE_FEATURES and spec.shape and isinstance(spec.shape[-1], int) and spec.shape[-1] > 0:
                return spec.shape[-1]
        return self.manifest.hidden_size

    @staticmethod
    def _input_dtype(runner: Runner, name: str) -> np.dtype:
        for spec in runner.input_metadata():
            if spec.name == name:
                return np.dtype(spec.dtype)
        raise PueError(
            f"{runner.name}: the graph has no input '{name}' (it takes {[s.name for s in runner.input_metadata()]})",
            "the bundle does not follow the pue graph contract; rebuild it with pue-export",
        )

    def _check_batch(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        pixel_values: np.ndarray | None,
        image_rows: np.ndarray,
    ) -> np.ndarray:
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise PueError(
                f"input_ids {list(input_ids.shape)} and attention_mask {list(attention_mask.shape)} "
                "must both be [batch, seq]"
            )
        batch = input_ids.shape[0]
        rows = np.asarray(image_rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= batch or np.any(np.diff(rows) < 0)):
            raise PueError(
                f"image_rows {rows.tolist()} must be non-decreasing row indices in [0, {batch}), one per image"
            )
        if len(rows) == 0 and pixel_values is not None and len(pixel_values):
            raise PueError(f"pixel_values holds {len(pixel_values)} images but image_rows lists no row")
        if len(rows) and (pixel_values is None or pixel_values.shape[0] != len(rows)):
            found = "none" if pixel_values is None else pixel_values.shape[0]
            raise PueError(f"image_rows lists {len(rows)} images but pixel_values holds {found}")
        # A row of k images holds exactly k × tokens_per_image image tokens (graph contract).
        counts = np.count_nonzero(input_ids == self.manifest.image_token_id, axis=1)
        expected = np.bincount(rows, minlength=batch) * self.manifest.tokens_per_image
        wrong = np.flatnonzero(counts != expected)
        if len(wrong):
            row = int(wrong[0])
            raise PueError(
                f"row {row} holds {counts[row]} image tokens, expected {expected[row]} "
                f"({expected[row] // self.manifest.tokens_per_image} images listed in image_rows)",
                "a row of k images carries k × tokens_per_image image tokens, a row without images none",
            )
        return rows


def decoder_output_width(manifest: Manifest) -> int:
    """The width of the decoder graph's `sentence_embedding` (the manifest's `embedding_dim` may be a Matryoshka cut
    of it, which the Embedder makes)."""
    decoder = manifest.graphs.get("decoder")
    for spec in decoder.outputs if decoder is not None else []:
        if spec.name == SENTENCE_EMBEDDING and spec.shape and isinstance(spec.shape[-1], int) and spec.shape[-1] > 0:
            return int(spec.shape[-1])
    return int(manifest.embedding_dim)


def feature_inputs(decoder_inputs: list[TensorSpec]) -> list[TensorSpec]:
    """The decoder's per-image inputs, in graph order: `image_features` and any an architecture adds (Qwen3-VL's
    `deepstack_features`): every input but `input_ids` and `attention_mask`, each a vision output of that name."""
    return [spec for spec in decoder_inputs if spec.name not in (INPUT_IDS, ATTENTION_MASK)]


def decoder_feed(
    decoder_inputs: list[TensorSpec],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    vision_outputs: Mapping[str, np.ndarray] | None,
    image_rows: np.ndarray,
    hidden_size: int,
) -> dict[str, np.ndarray]:
    """The decoder's feed for one tokenized batch: the one place where its inputs are built (backends, calibration).

    `vision_outputs` is the vision graph's outputs for the batch's images (None when no row has one), `image_rows`
    the row of each image. Every per-image input is placed per row (`place_image_features`); an all-text batch gets
    zeros of one image token (the dimension is dynamic and text rows ignore them).
    """
    feed = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}
    batch = input_ids.shape[0]
    for spec in feature_inputs(decoder_inputs):
        dtype = np.dtype(spec.dtype)
        if vision_outputs is not None and len(image_rows):
            feed[spec.name] = place_image_features(np.asarray(vision_outputs[spec.name]), image_rows, batch, dtype)
        else:
            trailing = [d if isinstance(d, int) and d > 0 else hidden_size for d in spec.shape[2:]]
            feed[spec.name] = np.zeros((batch, 1, *trailing), dtype=dtype)
    return feed


def place_image_features(features: np.ndarray, image_rows: np.ndarray, batch: int, dtype: np.dtype) -> np.ndarray:
    """A per-image decoder input [batch, max images × tokens, ...]: row b's images one after another.

    `features` [images, tokens, ...] is a vision graph output (`image_features` [images, tokens, hidden], or
    `deepstack_features` [images, tokens, levels, hidden]), `image_rows` the row of each image (non-decreasing). Row
    b's k-th image-token position reads slot k of its row (the decoder's gather), so its j-th image lands at slots
    j × tokens .. (j + 1) × tokens; slots past a row's images stay zero.
    """
    images, tokens = features.shape[:2]
    per_row = np.bincount(image_rows, minlength=batch) if images else np.zeros(batch, np.int64)
    placed = np.zeros((batch, max(1, int(per_row.max(initial=0))) * tokens, *features.shape[2:]), dtype=dtype)
    first_of_row = np.searchsorted(image_rows, np.arange(batch))
    for image, row in enumerate(int(r) for r in image_rows):
        slot = image - int(first_of_row[row])
        placed[row, slot * tokens : (slot + 1) * tokens] = features[image]
    return placed
