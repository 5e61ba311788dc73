"""Embedding recipes (data, not code) and their rendering through the checkpoint's own chat template."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pue.errors import PueError

TEXT_FIELD = "{text}"
RECIPE_IMAGE = "<image>"


@dataclass
class Recipe:
    name: str
    user: dict[str, str]
    assistant_prefix: str
    pooling: Any  # "last_token" or {"before_token": "<emb>"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def pool_token(self) -> str | None:
        return self.pooling["before_token"] if isinstance(self.pooling, dict) else None


def default_recipe_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "recipe_e5v.json"


def load_recipe(path: str | Path | None = None) -> Recipe:
    source = Path(path) if path is not None else default_recipe_path()
    if not source.is_file():
        raise PueError(f"recipe '{source}' does not exist", "pass a recipe.json (see the default in pue/data)")
    try:
        data = json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PueError(f"recipe '{source}' is not valid JSON: {exc}") from exc
    return recipe_from_dict(data, str(source))


def recipe_from_dict(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    problems = []
    user = data.get("user")
    if not isinstance(user, dict) or set(user) != {"image", "text", "composed"}:
        problems.append("'user' must map exactly image, text and composed to strings")
    else:
        if TEXT_FIELD not in user["text"] or TEXT_FIELD not in user["composed"]:
            problems.append("user.text and user.composed must contain {text}")
        if TEXT_FIELD in user["image"]:
            problems.append("user.image must not contain {text}")
    pooling = data.get("pooling", "last_token")
    if not (pooling == "last_token" or (isinstance(pooling, dict) and set(pooling) == {"before_token"})):
        problems.append('pooling must be "last_token" or {"before_token": "<token>"}')
    if not isinstance(data.get("assistant_prefix", ""), str):
        problems.append("assistant_prefix must be a string")
    if problems:
        raise PueError(f"{origin} is not a valid recipe: " + "; ".join(problems))
    return Recipe(
        name=str(data.get("name", "custom")),
        user=dict(user),
        assistant_prefix=data.get("assistant_prefix", ""),
        pooling=pooling,
    )


def chat_template_of(processor: Any) -> str:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise PueError("the checkpoint has no chat template", "add one (chat_template.jinja) to the checkpoint")
    return template


def render_user_turn(processor: Any, user: str, assistant_prefix: str) -> str:
    """The user turn through the checkpoint's chat template with the generation prompt, plus the prefix."""
    template = chat_template_of(processor)
    tokenizer = processor.tokenizer
    for content in (user, [{"type": "text", "text": user}]):
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:  # a template that wants the other content form
            continue
        if user in rendered:
            return rendered + assistant_prefix
    raise PueError("the checkpoint's chat template does not render the recipe's user string verbatim")


def render_prompts(processor: Any, recipe: Recipe) -> dict[str, str]:
    """Fully rendered templates for the manifest: {text} and the image placeholder left in."""
    image_token = image_placeholder(processor)
    return {
        kind: render_user_turn(processor, recipe.user[kind].replace(RECIPE_IMAGE, image_token), recipe.assistant_prefix)
        for kind in recipe.user
    }


def image_separator(processor: Any, checked_up_to: int = 4) -> str | None:
    """What the chat template puts between consecutive image parts of one user message, or None.

    Renders a user message of k image parts followed by a text part for k = 1..`checked_up_to` and reads the
    string between the first two placeholders; the rendering must be that separator repeated (k placeholders
    joined by it, the rest of the turn unchanged), so a prompt of k images is the single-image prompt with its
    placeholder replaced by k joined ones. None when the template renders no list content or is not of that form
    (the bundle then runs rows of one image only, and says so).
    """
    template = chat_template_of(processor)
    placeholder = image_placeholder(processor)
    marker = "PUE_TEXT_PART"

    def render(images: int) -> str | None:
        content = [{"type": "image"}] * images + [{"type": "text", "text": marker}]
        try:
            return processor.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], chat_template=template, tokenize=False
            )
        except Exception:  # a template that renders string content only
            return None

    one, two = render(1), render(2)
    if one is None or two is None or one.count(placeholder) != 1 or two.count(placeholder) != 2:
        return None
    first = two.index(placeholder) + len(placeholder)
    separator = two[first : two.index(placeholder, first)]
    at = one.index(placeholder)
    for images in range(1, checked_up_to + 1):
        joined = separator.join([placeholder] * images)
        if render(images) != one[:at] + joined + one[at + len(placeholder) :]:
            return None
    return separator


def image_placeholder(processor: Any) -> str:
    """The checkpoint's image token string; recipes write `<image>` and get the checkpoint's own."""
    return getattr(processor, "image_token", None) or RECIPE_IMAGE
