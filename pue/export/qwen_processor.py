"""The Qwen-VL processor for images and text, without its video part.

transformers' `Qwen2VLProcessor` cannot be constructed without torchvision (its video processor needs it, and
torchvision's wheel does not run with the CPU torch: NOTES.md). An embedder never sees video, so pue loads the
checkpoint's tokenizer and its image processor (`Qwen2VLImageProcessorPil`, the slow PIL one, as for every
reference) and does what the processor's `__call__` does for images: each image placeholder becomes
``grid_t × grid_h × grid_w / merge_size²`` placeholders before tokenizing, and ``mm_token_type_ids`` (1 at image
tokens) is returned for M-RoPE, which transformers 5 requires with images.

`processor_path` (``pue-export onnx --processor PATH``) reads the tokenizer, image processor and chat template
from another folder: HOMIE-style checkpoints take their processor from the base model's repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pue.errors import CheckpointError

DEFAULT_IMAGE_TOKEN = "<|image_pad|>"


class QwenVLProcessor:
    """Tokenizer + image processor with the processor's image-token expansion; video is not supported."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))
        self.pre_resize: dict[str, int] | None = None  # a recipe's own resize before the processor's (HOMIE)

    def prepare(self, image: Any) -> Any:
        """The recipe's own resize (`pre_resize`) as HOMIE's `qwen_vl_utils.fetch_image` does it: transformers'
        `smart_resize` of the image's size, then Pillow's `resize` with its default filter; else the image."""
        if not self.pre_resize:
            return image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        height, width = smart_resize(
            image.height,
            image.width,
            factor=self.pre_resize["factor"],
            min_pixels=self.pre_resize["min_pixels"],
            max_pixels=self.pre_resize["max_pixels"],
        )
        return image.resize((width, height))

    def __call__(
        self,
        text: list[str],
        images: list[Any] | None = None,
        padding: bool = True,
        return_tensors: str = "pt",
        add_special_tokens: bool = False,
    ) -> dict[str, Any]:
        texts = list(text)
        data: dict[str, Any] = {}
        if images:
            encoded = self.image_processor(images=images, return_tensors=return_tensors)
            merge = int(self.image_processor.merge_size) ** 2
            counts = iter(int(n) for n in (encoded["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [self._expand(t, counts) for t in texts]
            if next(counts, None) is not None:
                raise CheckpointError("more images than image placeholders in the prompts")
            data.update(encoded)
        tokens = self.tokenizer(
            texts, padding=padding, return_tensors=return_tensors, add_special_tokens=add_special_tokens
        )
        data.update(tokens)
        data["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).to(tokens["input_ids"].dtype)
        return data

    def _expand(self, text: str, counts: Any) -> str:
        parts = text.split(self.image_token)
        expanded = parts[0]
        for part in parts[1:]:
            count = next(counts, None)
            if count is None:
                raise CheckpointError("more image placeholders in the prompts than images")
            expanded += self.image_token * count + part
        return expanded


def load_qwen_processor(path: Path) -> QwenVLProcessor:
    """The tokenizer, PIL image processor and chat template of a Qwen-VL checkpoint (or processor) folder.

    Reads both layouts: transformers 5's `processor_config.json` (image processor inside) and the
    `preprocessor_config.json` + `chat_template.json` that published checkpoints ship.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise CheckpointError(
            f"cannot load the tokenizer of '{path}': {exc}", "pass --processor with the base model's folder"
        ) from exc
    config = _image_processor_config(path)
    keys = set(Qwen2VLImageProcessorPil.valid_kwargs.__annotations__) | {
        "size",
        "resample",
        "rescale_factor",
        "image_mean",
        "image_std",
        "do_resize",
        "do_rescale",
        "do_normalize",
        "do_convert_rgb",
    }
    image_processor = Qwen2VLImageProcessorPil(**{k: v for k, v in config.items() if k in keys})
    return QwenVLProcessor(tokenizer, image_processor, _chat_template(path, tokenizer))


def _image_processor_config(path: Path) -> dict[str, Any]:
    combined = path / "processor_config.json"
    if combined.is_file():
        data = json.loads(combined.read_text())
        if isinstance(data.get("image_processor"), dict):
            return dict(data["image_processor"])
    separate = path / "preprocessor_config.json"
    if separate.is_file():
        return dict(json.loads(separate.read_text()))
    raise CheckpointError(
        f"'{path}' has no image processor config (processor_config.json or preprocessor_config.json)",
        "pass --processor with the folder of the base model's processor",
    )


def _chat_template(path: Path, tokenizer: Any) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = path / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)
