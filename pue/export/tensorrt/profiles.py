"""Optimisation profiles of the two engines, derived from the parent bundle's manifest.

- vision `pixel_values`: images MIN:OPT:MAX × max-images (a batch's rows may hold up to --max-images images each),
  every other dimension as the manifest's graph input fixes it (`[images, crops, 3, H, W]`, or `[images, 3, H, W]`
  for architectures without crops);
- decoder `input_ids` / `attention_mask`: batch MIN:OPT:MAX, sequence 1..max-seq, tuned for an image prompt
  (tokens_per_image + 64);
- decoder `image_features`: batch MIN:OPT:MAX, image tokens 1..max-images × tokens_per_image (all-text batches
  send 1; a row of k images takes k × tokens_per_image); any other per-image input (Qwen3-VL's
  `deepstack_features [batch, image_tokens, levels, hidden]`) the same ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

from pue.bundle import Manifest, TensorSpec
from pue.errors import BundleError, PueError
from pue.runtime.backends.base import ATTENTION_MASK, IMAGE_FEATURES, INPUT_IDS, PIXEL_VALUES, feature_inputs
from pue.runtime.backends.tensorrt_compat import ShapeRange

DEFAULT_BATCH = "1:8:32"
TEXT_ALLOWANCE = 512  # tokens beyond an image prompt that the default --max-seq leaves for text
OPT_TEXT_TOKENS = 64  # a typical composed query: the image plus a short instruction
SEQUENCE_ROUNDING = 64


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def parse_batch(text: str) -> BatchRange:
    """ "MIN:OPT:MAX" with 1 <= MIN <= OPT <= MAX."""
    parts = str(text).split(":")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise PueError(
            f"--batch {text!r} is not MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX",
            f"e.g. --batch {DEFAULT_BATCH} (smallest, tuned-for and largest batch)",
        )
    return BatchRange(*values)


def default_max_seq(manifest: Manifest, max_images: int = 1) -> int:
    """A prompt of `max_images` images plus TEXT_ALLOWANCE tokens, rounded up to a multiple of 64, within the model's
    limit."""
    wanted = max_images * manifest.tokens_per_image + TEXT_ALLOWANCE
    rounded = -(-wanted // SEQUENCE_ROUNDING) * SEQUENCE_ROUNDING
    return min(rounded, manifest.max_seq_len)


def check_max_images(manifest: Manifest, max_images: int) -> int:
    """--max-images: at least 1; above 1 only for bundles whose rows may hold several images (format 1.2)."""
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise PueError(f"--max-images must be a positive integer, got {max_images!r}")
    if max_images > 1 and manifest.prompts.image_separator is None:
        raise PueError(
            f"--max-images {max_images}: this bundle takes one image per row (it predates format 1.2)",
            f"re-export it with pue-export onnx {manifest.source_checkpoint.name} -o BUNDLE, then build from that",
        )
    return max_images


def resolve_max_seq(manifest: Manifest, max_seq: int | None, max_images: int = 1) -> int:
    if max_seq is None:
        return default_max_seq(manifest, max_images)
    image_tokens = max_images * manifest.tokens_per_image
    if max_seq <= image_tokens:
        raise PueError(
            f"--max-seq {max_seq} leaves no room for a prompt of {max_images} image(s) ({image_tokens} image "
            "tokens plus the template)",
            f"use at least {image_tokens + OPT_TEXT_TOKENS}, e.g. {default_max_seq(manifest, max_images)}",
        )
    if max_seq > manifest.max_seq_len:
        raise PueError(
            f"--max-seq {max_seq} exceeds the model's maximum sequence {manifest.max_seq_len}",
            f"use at most {manifest.max_seq_len}",
        )
    return max_seq


def _fixed_dims(spec: TensorSpec, graph: str) -> list[int]:
    """The non-batch dimensions of a graph input, which must be fixed numbers."""
    dims = spec.shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise BundleError(
            f"{graph} input '{spec.name}' has shape {spec.shape}: only the batch may be dynamic",
            "rebuild the bundle with pue-export onnx (it fixes the crop layout per tile size)",
        )
    return [int(d) for d in dims]


def _input(manifest: Manifest, graph: str, name: str) -> TensorSpec:
    for spec in manifest.graphs[graph].inputs:
        if spec.name == name:
            return spec
    raise BundleError(f"the {graph} graph has no input '{name}'", "the bundle does not follow the pue graph contract")


def engine_profiles(
    manifest: Manifest, batch: BatchRange, max_seq: int, max_images: int = 1
) -> dict[str, dict[str, ShapeRange]]:
    """{graph: {input: ShapeRange}} for the vision and decoder engines; rows of up to `max_images` images."""
    pixels = _fixed_dims(_input(manifest, "vision", PIXEL_VALUES), "vision")
    features = _input(manifest, "decoder", IMAGE_FEATURES)
    hidden = features.shape[-1] if isinstance(features.shape[-1], int) else manifest.hidden_size
    tokens = manifest.tokens_per_image
    opt_seq = min(tokens + OPT_TEXT_TOKENS, max_seq)
    sequence = ShapeRange((batch.min, 1), (batch.opt, opt_seq), (batch.max, max_seq))
    return {
        "vision": {
            PIXEL_VALUES: ShapeRange((batch.min, *pixels), (batch.opt, *pixels), (batch.max * max_images, *pixels)),
        },
        "decoder": {
            INPUT_IDS: sequence,
            ATTENTION_MASK: sequence,
            IMAGE_FEATURES: ShapeRange(
                (batch.min, 1, hidden), (batch.opt, tokens, hidden), (batch.max, max_images * tokens, hidden)
            ),
            **{
                spec.name: _per_image_range(spec, batch, tokens, max_images, hidden)
                for spec in feature_inputs(manifest.graphs["decoder"].inputs)
                if spec.name != IMAGE_FEATURES
            },
        },
    }


def _per_image_range(spec: TensorSpec, batch: BatchRange, tokens: int, max_images: int, hidden: int) -> ShapeRange:
    """A per-image decoder input beyond image_features ([batch, image_tokens, levels, hidden], e.g. DeepStack): the
    same batch and image-token ranges, its other dimensions as the manifest fixes them."""
    rest = tuple(d if isinstance(d, int) and d > 0 else hidden for d in spec.shape[2:])
    return ShapeRange((batch.min, 1, *rest), (batch.opt, tokens, *rest), (batch.max, max_images * tokens, *rest))
