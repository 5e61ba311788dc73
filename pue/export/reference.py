"""`ReferenceEmbedder`: the ground truth. transformers + torch on the checkpoint as published.

Every backend is judged against this: same recipe, same chat template, the slow (PIL) image processor,
and images brought to the tile size by the runtime's own `fit_to_tile`, so both sides see identical inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pue.errors import InputError, PueError
from pue.export.checkpoint import CheckpointInfo, inspect_checkpoint, load_model, load_processor
from pue.export.recipe import (
    TEXT_FIELD,
    Recipe,
    check_embedding_dim,
    image_placeholder,
    image_separator,
    load_recipe,
    render_prompts,
)
from pue.runtime.embedder import matryoshka_cut
from pue.runtime.images import fit_to_tile, load_image
from pue.runtime.prompts import join_images

log = logging.getLogger(__name__)

MOST_IMAGES_CHECKED = 64  # max_images_per_row looks no further


class ReferenceEmbedder:
    """Embeds images, texts and composed queries with the PyTorch model (one forward pass, no generation)."""

    def __init__(
        self,
        info: CheckpointInfo,
        model: Any,
        processor: Any,
        recipe: Recipe,
        tile_size: int,
        batch_size: int = 8,
        embedding_dim: int | None = None,
    ) -> None:
        from pue.export.architectures import get_architecture

        self.info = info
        self.model = model
        self.processor = processor
        self.recipe = recipe
        self.tile_size = tile_size
        self.batch_size = batch_size
        self.architecture = get_architecture(info.model_type)
        if recipe.image_resize is not None:
            if not hasattr(processor, "pre_resize"):
                raise PueError(
                    f"the recipe '{recipe.name}' resizes images itself (image_resize), which only Qwen-VL "
                    f"processors do; {info.model_type} does not",
                    "use a recipe without image_resize",
                )
            processor.pre_resize = dict(recipe.image_resize)
        self.geometry = self.architecture.geometry(model, tile_size, processor)
        self.embedding_dim = check_embedding_dim(recipe, self.architecture.hidden_size(model), embedding_dim)
        self.image_token = image_placeholder(processor)
        self.rendered_prompts = render_prompts(processor, recipe)
        self.image_separator = image_separator(processor)
        self.pool_token_id = None
        if recipe.pool_token is not None:
            self.pool_token_id = processor.tokenizer.convert_tokens_to_ids(recipe.pool_token)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        tile_size: int = 224,
        recipe: str | Path | Recipe | None = None,
        batch_size: int = 8,
        processor: str | Path | None = None,
        embedding_dim: int | None = None,
    ) -> ReferenceEmbedder:
        """`processor`: a folder to read the processor from instead of the checkpoint (`--processor`);
        `embedding_dim`: a Matryoshka cut where the recipe allows one (the bundle's `embedding_dim`)."""
        info = inspect_checkpoint(checkpoint)
        resolved = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        processor = load_processor(info, processor)
        processor.tokenizer.padding_side = "right"  # HF positions are arange: right padding keeps them exact
        model = load_model(info, dtype=dtype, device=device)
        return cls(info, model, processor, resolved, tile_size, batch_size, embedding_dim)

    @property
    def takes_image_sets(self) -> bool:
        """Whether the chat template renders several image parts in one user turn (`image_separator`)."""
        return self.image_separator is not None

    @property
    def max_images_per_row(self) -> int:
        """The most images an image row can hold within the language model's positions (the bundle's
        max_seq_len), counted the HF processor's way: the prompt's tokens plus tokens_per_image per image."""
        if self.image_separator is None:
            return 1
        limit = int(getattr(self.model.config.text_config, "max_position_embeddings", 4096))
        fitting = 1
        for images in range(2, MOST_IMAGES_CHECKED + 1):
            ids = self.processor.tokenizer(self.prompt("image", images=images), add_special_tokens=False)["input_ids"]
            if len(ids) - images + images * self.geometry.tokens_per_image > limit:
                break
            fitting = images
        return fitting

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    # --- public API: the same contract as pue.runtime.Embedder -------------------------------------------
    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        return self._embed("image", [[image] for image in images], texts=None)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed("text", None, texts=list(texts))

    def embed_composed(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        if len(images) != len(texts):
            raise InputError(f"embed_composed needs as many texts as images (got {len(images)} and {len(texts)})")
        return self._embed("composed", [[image] for image in images], texts=list(texts))

    def embed_image_sets(self, image_sets: Sequence[Sequence[Any]], texts: Sequence[str] | None = None) -> np.ndarray:
        """One vector per set of images in one prompt, in order (with `texts`: composed rows of several images)."""
        sets = [list(images) for images in image_sets]
        if texts is not None and len(texts) != len(sets):
            raise InputError(f"embed_image_sets needs one text per set (got {len(sets)} sets and {len(texts)} texts)")
        for index, images in enumerate(sets):
            if not images:
                raise InputError("an image set is empty", index=index)
        return self._embed("image" if texts is None else "composed", sets, None if texts is None else list(texts))

    def image_features(self, images: Sequence[Any]) -> np.ndarray:
        """The HF model's packed image features [N, tokens_per_image, hidden] (vision.onnx's ground truth)."""
        return self.vision_outputs(images)["image_features"]

    def vision_outputs(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Every tensor vision.onnx returns, as the HF model computes it: `image_features` and, for Qwen3-VL,
        `deepstack_features` [N, tokens_per_image, levels, hidden]."""
        import torch

        tiles = self.tiles(images)
        out: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(tiles), self.batch_size):
            pixels = self.pixel_values(tiles[start : start + self.batch_size])
            with torch.inference_mode():
                got = self.architecture.reference_image_features(self.model, pixels, self.geometry)
            for name, value in (got if isinstance(got, dict) else {"image_features": got}).items():
                out.setdefault(name, []).append(value.cpu().numpy())
        if not out:
            return {"image_features": np.zeros((0, self.geometry.tokens_per_image, 0), np.float32)}
        return {name: np.concatenate(values) for name, values in out.items()}

    # --- helpers --------------------------------------------------------------------------------------
    def tiles(self, images: Sequence[Any]) -> list[Any]:
        tiles, resized = [], 0
        for index, item in enumerate(images):
            tile, changed = fit_to_tile(load_image(item, index), self.tile_size)
            prepare = getattr(self.processor, "prepare", None)
            tiles.append(tile if prepare is None else prepare(tile))
            resized += int(changed)
        if resized:
            log.info("brought %d of %d images to the %d px tile size", resized, len(tiles), self.tile_size)
        return tiles

    def pixel_values(self, tiles: list[Any]) -> Any:
        encoded = self.processor.image_processor(images=tiles, return_tensors="pt")
        pixels = encoded["pixel_values"]
        if self.geometry.kind == "patches":  # the processor concatenates every tile's patches
            pixels = pixels.reshape(len(tiles), self.geometry.patches, self.geometry.patch_dim)
        return pixels.to(self.device)

    def prompt(self, kind: str, text: str | None = None, index: int = 0, images: int = 1) -> str:
        """The recipe's rendered template (chat template applied once, as stored in bundles) with the text in and,
        for `images` > 1, the image placeholder repeated as the chat template renders that many image parts."""
        template = self.rendered_prompts[kind]
        if kind != "text" and images != 1:
            if self.image_separator is None:
                raise InputError(
                    f"the row has {images} images; the checkpoint's chat template does not render several image parts",
                    index=index,
                )
            template = join_images(template, self.image_token, self.image_separator, images)
        if text is None:
            return template
        if self.image_token in text:
            raise InputError(f"text contains the image token {self.image_token!r}", index=index)
        return template.replace(TEXT_FIELD, text, 1)

    def _embed(self, kind: str, image_sets: list[list[Any]] | None, texts: list[str] | None) -> np.ndarray:
        import torch

        count = len(image_sets) if image_sets is not None else len(texts or [])
        hidden = self.embedding_dim
        tile_sets = [self.tiles(images) for images in image_sets] if image_sets is not None else None
        prompts = [
            self.prompt(
                kind,
                None if texts is None else texts[i],
                i,
                images=1 if tile_sets is None else len(tile_sets[i]),
            )
            for i in range(count)
        ]
        results = []
        for start in range(0, count, self.batch_size):
            stop = min(start + self.batch_size, count)
            kwargs: dict[str, Any] = {"text": prompts[start:stop], "padding": True, "return_tensors": "pt"}
            if tile_sets is not None:
                kwargs["images"] = [tile for tiles in tile_sets[start:stop] for tile in tiles]
            encoded = self.processor(**kwargs, add_special_tokens=False)
            inputs = {k: v.to(self.device) for k, v in encoded.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                hidden_states = self.model.model(**inputs, use_cache=False).last_hidden_state
            results.append(self._pool(hidden_states, inputs["input_ids"], inputs["attention_mask"]))
        if not results:
            return np.zeros((0, hidden), np.float32)
        return np.concatenate(results)

    def _pool(self, hidden: Any, input_ids: Any, attention_mask: Any) -> np.ndarray:
        import torch

        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if self.pool_token_id is None:
            index = (positions * attention_mask).amax(dim=1)
        else:
            index = (positions * (input_ids == self.pool_token_id)).amax(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        # Matryoshka: the runtime's own cut (the first values, renormalised), so both sides cut alike
        return matryoshka_cut(pooled.cpu().numpy().astype(np.float32), self.embedding_dim)

    def close(self) -> None:
        """Free the model (the export frees torch before onnxruntime loads the graphs)."""
        import gc

        self.model = None
        gc.collect()
