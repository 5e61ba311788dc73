"""Prompt token ids from the manifest's rendered prompts, with `tokenizers` alone (no Jinja, no transformers).

The manifest's prompts are the checkpoint's chat template already rendered around the recipe's user strings,
with `{text}` and the image placeholder left in. They already hold BOS where the template adds it, so they
are encoded without special tokens (adding them again would put a second BOS in front: the BOS trap). The
one image placeholder becomes `tokens_per_image` image-token ids, as the HF processor does when it repeats
the placeholder string before tokenizing.

A row of k images renders the template's one placeholder as k placeholders joined by the bundle's
`image_separator` (what the checkpoint's chat template puts between image parts, `join_images`); each becomes
`tokens_per_image` image-token ids, in order. Rows whose images alone exceed `max_seq_len` are refused with the
count: text is truncated, never an image.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from pue.bundle import Manifest, Prompts, resolve_inside
from pue.errors import BundleError, InputError

TEXT_SLOT = "{text}"


def join_images(template: str, placeholder: str, separator: str, images: int) -> str:
    """`template` (one image placeholder) with that placeholder repeated `images` times, joined by `separator`."""
    if images < 1:
        raise ValueError(f"a prompt with images needs at least one, got {images}")
    return template.replace(placeholder, separator.join([placeholder] * images), 1)


class PromptTruncationWarning(UserWarning):
    """Some texts were longer than the bundle's max_seq_len and lost the end of their text."""


@dataclass
class _Encoded:
    ids: list[int]
    original_length: int  # tokens before truncation, image expanded

    @property
    def truncated(self) -> bool:
        return self.original_length > len(self.ids)


class PromptTokenizer:
    """Token ids of image, text and composed prompts, and their right-padded batches."""

    def __init__(
        self,
        tokenizer_file: str | os.PathLike[str],
        prompts: Prompts,
        image_token_id: int,
        tokens_per_image: int,
        max_seq_len: int,
        pad_token_id: int,
        reexport_hint: str = "re-export the bundle with pue-export onnx",
    ) -> None:
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise BundleError(f"cannot read tokenizer '{tokenizer_file}': {exc}", "rebuild the bundle") from exc
        # The bundle's tokenizer.json may carry the checkpoint's own padding/truncation; pue does both itself.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.prompts = prompts
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_seq_len = max_seq_len
        self.pad_token_id = pad_token_id
        self.reexport_hint = reexport_hint
        self._check_prompts()
        self._image_prompts: dict[int, list[int]] = {}

    @classmethod
    def for_bundle(cls, bundle_dir: str | os.PathLike[str], manifest: Manifest) -> PromptTokenizer:
        """The prompt tokenizer a bundle's manifest describes (its tokenizer.json, prompts and token counts)."""
        return cls(
            resolve_inside(bundle_dir, manifest.tokenizer.file.path),
            manifest.prompts,
            image_token_id=manifest.image_token_id,
            tokens_per_image=manifest.tokens_per_image,
            max_seq_len=manifest.max_seq_len,
            pad_token_id=manifest.tokenizer.pad_token_id,
            reexport_hint=(
                f"re-export it from its checkpoint: pue-export onnx {manifest.source_checkpoint.name} -o BUNDLE"
            ),
        )

    def _check_prompts(self) -> None:
        placeholder = self.prompts.image_placeholder
        placeholder_ids = self.tokenizer.encode(placeholder, add_special_tokens=False).ids
        if placeholder_ids != [self.image_token_id]:
            raise BundleError(
                f"the image placeholder {placeholder!r} tokenizes to {placeholder_ids}, "
                f"not to the image token id [{self.image_token_id}]",
                "the manifest and tokenizer.json do not belong together; rebuild the bundle",
            )
        expected = {"image": (0, 1), "text": (1, 0), "composed": (1, 1)}
        for kind, (text_slots, placeholders) in expected.items():
            template = getattr(self.prompts, kind)
            found = (template.count(TEXT_SLOT), template.count(placeholder))
            if found != (text_slots, placeholders):
                raise BundleError(
                    f"the {kind} prompt holds {found[0]} '{TEXT_SLOT}' and {found[1]} {placeholder!r}, "
                    f"expected {text_slots} and {placeholders}: {template!r}",
                    "rebuild the bundle with pue-export onnx",
                )

    def max_images(self, most: int = 64) -> int:
        """The most images an image row can hold within max_seq_len (1 for a bundle that takes one per row)."""
        if self.prompts.image_separator is None:
            return 1
        fitting = 1
        for images in range(2, most + 1):
            try:
                self.image_prompt(images)
            except InputError:
                break
            fitting = images
        return fitting

    def image_prompt(self, images: int = 1, index: int | None = None) -> list[int]:
        """Ids of the image prompt for a row of `images` images, placeholders expanded (computed once per count)."""
        if images not in self._image_prompts:
            template = self._template("image", images, index)
            encoding = self.tokenizer.encode(template, add_special_tokens=False)
            ids = self._expand_image(encoding.ids, expected_images=images, index=None)
            if len(ids) > self.max_seq_len:
                self._refuse_too_long(len(ids), images, index)
            self._image_prompts[images] = ids
        return list(self._image_prompts[images])

    def encode(
        self, kind: str, text: str | None, index: int = 0, truncate: bool = True, images: int = 1
    ) -> tuple[list[int], bool]:
        """Ids of one row ("image", "text" or "composed"; `images` of them in image and composed rows) and
        whether its text was truncated; no warning."""
        if kind == "image":
            return self.image_prompt(images, index), False
        if kind == "text":
            template, images = self.prompts.text, 0
        else:
            template = self._template("composed", images, index)
        encoded = self._encode(template, text if text is not None else "", images, index, truncate)
        return encoded.ids, encoded.truncated

    def _template(self, kind: str, images: int, index: int | None) -> str:
        template = getattr(self.prompts, kind)
        if images == 1:
            return template
        if images < 1:
            raise InputError(f"an {kind} row needs at least one image, got {images}", index=index)
        if self.prompts.image_separator is None:
            raise InputError(
                f"the row has {images} images; this bundle takes one image per row (it predates format 1.2, or its "
                "chat template cannot render several image parts)",
                index=index,
                hint=self.reexport_hint,
            )
        return join_images(template, self.prompts.image_placeholder, self.prompts.image_separator, images)

    def _refuse_too_long(self, length: int, images: int, index: int | None) -> None:
        if images > 1:  # the row asked for more images than fit: its fault, named with the count
            image_tokens = images * self.tokens_per_image
            raise InputError(
                f"the row's {images} images take {image_tokens} tokens ({self.tokens_per_image} each), its prompt "
                f"{length}, more than the bundle's max_seq_len {self.max_seq_len}; images are never truncated",
                index=index,
                hint="embed fewer images per row: their tokens and the prompt must fit in max_seq_len",
            )
        raise BundleError(
            f"the image prompt has {length} tokens, more than the bundle's max_seq_len {self.max_seq_len}",
            "rebuild the bundle with a larger max_seq_len",
        )

    def warn_truncated(self, indices: list[int], total: int) -> None:
        """One warning for all rows of a call that lost the end of their text."""
        _warn_truncated(indices, total, self.max_seq_len, stacklevel=4)

    def pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask, int64 [B, S], right-padded with pad_token_id."""
        length = max((len(row) for row in rows), default=0)
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def _encode(self, template: str, text: str, images: int, index: int, truncate: bool) -> _Encoded:
        if not isinstance(text, str):
            raise InputError(f"expected a str, got {type(text).__name__}", index=index)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            reason = f"{exc.reason} at character {exc.start}"
            raise InputError(f"the text is not valid Unicode ({reason})", index=index) from exc
        placeholder = self.prompts.image_placeholder
        if placeholder in text:
            raise InputError(
                f"the text contains the image placeholder {placeholder!r}",
                index=index,
                hint="texts may not open image slots; remove or rephrase the placeholder",
            )
        start = template.index(TEXT_SLOT)
        # The whole prompt is tokenized at once, as the reference does: tokens may merge across the boundary.
        encoding = self.tokenizer.encode(template.replace(TEXT_SLOT, text, 1), add_special_tokens=False)
        ids = self._expand_image(encoding.ids, images, index)
        original_length = len(ids)
        if original_length <= self.max_seq_len:
            return _Encoded(ids, original_length)
        if not truncate:
            raise InputError(
                f"the prompt has {original_length} tokens, more than the bundle's max_seq_len {self.max_seq_len}",
                index=index,
                hint="shorten the text, or allow truncation",
            )
        while len(ids) > self.max_seq_len:
            if not text and images > 1:
                self._refuse_too_long(len(ids), images, index)
            if not text:
                raise BundleError(
                    f"the prompt without any text has {len(ids)} tokens, more than max_seq_len {self.max_seq_len}",
                    "rebuild the bundle with a larger max_seq_len",
                )
            text = text[: self._cut(encoding.offsets, start, len(text), len(ids) - self.max_seq_len)]
            encoding = self.tokenizer.encode(template.replace(TEXT_SLOT, text, 1), add_special_tokens=False)
            ids = self._expand_image(encoding.ids, images, index)
        return _Encoded(ids, original_length)

    @staticmethod
    def _cut(offsets: list[tuple[int, int]], start: int, length: int, excess: int) -> int:
        """How many characters of the text to keep so that its last `excess` tokens go.

        The text spans characters [start, start + length) of the prompt; the tokens covering it are those
        whose character offsets overlap that span. The prompt is re-encoded after the cut (the template's
        suffix stays intact), and cut again in the rare case that merges made it no shorter.
        """
        end = start + length
        covering = [first for first, last in offsets if first < end and last > start]
        keep = len(covering) - excess
        if keep <= 0:
            return 0
        return min(max(covering[keep] - start, 0), length - 1)

    def _expand_image(self, ids: list[int], expected_images: int, index: int | None) -> list[int]:
        positions = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(positions) != expected_images:
            if index is not None and len(positions) > expected_images:
                raise InputError(
                    f"the text contains a special token that tokenizes to the image token (id {self.image_token_id})",
                    index=index,
                    hint="texts may not open image slots; remove that token",
                )
            raise BundleError(
                f"a prompt holds {len(positions)} image tokens (id {self.image_token_id}), expected {expected_images}",
                "the manifest and tokenizer.json do not belong together; rebuild the bundle",
            )
        expanded: list[int] = []
        for token in ids:
            if token == self.image_token_id:
                expanded.extend([self.image_token_id] * self.tokens_per_image)
            else:
                expanded.append(token)
        return expanded


def _warn_truncated(indices: list[int], total: int, max_seq_len: int, stacklevel: int = 3) -> None:
    if not indices:
        return
    shown = ", ".join(str(i) for i in indices[:10]) + (", …" if len(indices) > 10 else "")
    warnings.warn(
        f"{len(indices)} of {total} texts were longer than max_seq_len {max_seq_len} tokens and lost the end of "
        f"their text (items {shown})",
        PromptTruncationWarning,
        stacklevel=stacklevel,
    )
