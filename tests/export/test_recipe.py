"""Recipes: shipped ones by name, the system turn and content-part rendering (Qwen templates), clear refusals;
`--processor` reads the processor from another folder."""

from __future__ import annotations

import shutil

import pytest

from pue.errors import CheckpointError, PueError
from pue.export.recipe import load_recipe, recipe_from_dict, render_prompts, shipped_recipes

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen_like():
    """A processor stand-in with the tiny Qwen tokenizer and chat template (no model, no image processor)."""
    from pue.export.tiny_qwen import QWEN_CHAT_TEMPLATE, QWEN_TOKENS
    from pue.export.tiny_tokenizer import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_TOKENS)}, replace_extra_special_tokens=False)

    class Processor:
        image_token = "<|image_pad|>"
        chat_template = QWEN_CHAT_TEMPLATE

    Processor.tokenizer = tokenizer
    return Processor()


def test_shipped_recipes_load_by_name():
    assert {"e5v", "gme"} <= set(shipped_recipes())
    gme = load_recipe("gme")
    assert (gme.system, gme.content, gme.pooling) == ("You are a helpful assistant.", "parts", "last_token")
    assert load_recipe().name == "e5v" and load_recipe().content == "string" and load_recipe().system is None
    with pytest.raises(PueError, match="gme"):
        load_recipe("no-such-recipe")


def test_gme_renders_images_as_vision_parts_after_its_system_turn(qwen_like):
    rendered = render_prompts(qwen_like, load_recipe("gme"))
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    end = "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    assert rendered["image"] == f"{system}<|vision_start|><|image_pad|><|vision_end|>{end}"
    assert rendered["text"] == f"{system}{{text}}{end}"
    assert rendered["composed"] == f"{system}<|vision_start|><|image_pad|><|vision_end|>{{text}}{end}"


def test_string_content_keeps_the_placeholder_bare(qwen_like):
    """The E5-V recipe renders its user string as is: the image placeholder without Qwen's vision markers."""
    rendered = render_prompts(qwen_like, load_recipe())
    assert "<|image_pad|>\nSummary above image" in rendered["image"] and "<|vision_start|>" not in rendered["image"]


def test_bad_recipe_fields_are_refused():
    base = {"user": {"image": "<image>", "text": "{text}", "composed": "<image>{text}"}}
    with pytest.raises(PueError, match="content must be one of string, parts"):
        recipe_from_dict({**base, "content": "list"})
    with pytest.raises(PueError, match="system must be a string"):
        recipe_from_dict({**base, "system": 3})


def test_a_template_without_content_parts_is_refused_with_advice(qwen_like):
    class StringOnly:
        image_token = "<|image_pad|>"
        chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        tokenizer = qwen_like.tokenizer

    recipe = recipe_from_dict({**load_recipe("gme").to_dict(), "system": None})
    with pytest.raises(PueError, match='"content": "string"'):
        render_prompts(StringOnly(), recipe)


def test_processor_from_another_folder(tmp_path, tiny_checkpoint):
    from pue.export.checkpoint import inspect_checkpoint, load_processor

    source = tiny_checkpoint("qwen2_vl", "ci")
    weights, processor = tmp_path / "weights", tmp_path / "processor"
    weights.mkdir()
    processor.mkdir()
    for path in source.iterdir():
        target = weights if path.name in {"config.json", "model.safetensors"} else processor
        shutil.copy(path, target / path.name)
    info = inspect_checkpoint(weights)
    with pytest.raises(CheckpointError, match="--processor"):
        load_processor(info)
    loaded = load_processor(info, processor)
    assert loaded.image_token == "<|image_pad|>" and loaded.image_processor.merge_size == 2
    with pytest.raises(CheckpointError, match="does not exist"):
        load_processor(info, tmp_path / "missing")
