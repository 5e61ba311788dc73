"""Embedding recipes (data, not code) and their rendering through the checkpoint's own chat template."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pue.errors import PueError

TEXT_FIELD = "{text}"
RECIPE_IMAGE = "<image>"
CONTENT_FORMS = ("string", "parts")


@dataclass
class Recipe:
    """How a query is put to the model.

    `system`: a system turn rendered before the user turn (None: the template's own default, if any).
    `content`: "string" renders the user string as the message content, `<image>` replaced by the checkpoint's
    image placeholder (LLaVA templates); "parts" renders it as a list of content parts, `<image>` becoming an
    image part and the text around it text parts, so templates that wrap images themselves (Qwen's
    `<|vision_start|><|image_pad|><|vision_end|>`) do so.
    `image_resize`: the recipe's own resize of every image before the processor's, `{"factor", "min_pixels",
    "max_pixels"}` by Qwen's `smart_resize` rule (HOMIE: factor 28, 4·28² to 625·28² pixels); patch models only.
    `matryoshka`: `{"min_dim": N}` where the model was trained for shorter outputs (Qwen3-VL-Embedding): an
    embedding may be cut to its first D ≥ N values and renormalised (`--embedding-dim`); None: never cut.
    """

    name: str
    user: dict[str, str]
    assistant_prefix: str
    pooling: Any  # "last_token" or {"before_token": "<emb>"}
    system: str | None = None
    content: str = "string"
    image_resize: dict[str, int] | None = None
    matryoshka: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def pool_token(self) -> str | None:
        return self.pooling["before_token"] if isinstance(self.pooling, dict) else None


def default_recipe_path() -> Path:
    return shipped_recipe_path("e5v")


def shipped_recipe_path(name: str) -> Path:
    """`pue/data/recipe_<name>.json`: the recipes shipped with pue (e5v, gme, homie, qwen3_vl_embedding)."""
    return Path(__file__).resolve().parent.parent / "data" / f"recipe_{name}.json"


def shipped_recipes() -> list[str]:
    folder = default_recipe_path().parent
    return sorted(path.stem.removeprefix("recipe_") for path in folder.glob("recipe_*.json"))


def load_recipe(path: str | Path | None = None) -> Recipe:
    """A recipe from a recipe.json path, or a shipped one by name (`gme`); the E5-V recipe by default."""
    source = Path(path) if path is not None else default_recipe_path()
    if not source.is_file() and path is not None and str(path) in shipped_recipes():
        source = shipped_recipe_path(str(path))
    if not source.is_file():
        raise PueError(
            f"recipe '{source}' does not exist",
            f"pass a recipe.json or a shipped recipe's name ({', '.join(shipped_recipes())})",
        )
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
    if data.get("system") is not None and not isinstance(data.get("system"), str):
        problems.append("system must be a string or null")
    if data.get("content", "string") not in CONTENT_FORMS:
        problems.append(f"content must be one of {', '.join(CONTENT_FORMS)}")
    resize = data.get("image_resize")
    if resize is not None and (
        not isinstance(resize, dict)
        or set(resize) != {"factor", "min_pixels", "max_pixels"}
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in resize.values())
    ):
        problems.append("image_resize must map factor, min_pixels and max_pixels to positive integers")
    matryoshka = data.get("matryoshka")
    if matryoshka is not None and (
        not isinstance(matryoshka, dict)
        or set(matryoshka) != {"min_dim"}
        or not isinstance(matryoshka["min_dim"], int)
        or matryoshka["min_dim"] < 1
    ):
        problems.append('matryoshka must be {"min_dim": N} with N a positive integer')
    if problems:
        raise PueError(f"{origin} is not a valid recipe: " + "; ".join(problems))
    return Recipe(
        name=str(data.get("name", "custom")),
        user=dict(user),
        assistant_prefix=data.get("assistant_prefix", ""),
        pooling=pooling,
        system=data.get("system"),
        content=data.get("content", "string"),
        image_resize=None if resize is None else dict(resize),
        matryoshka=None if matryoshka is None else dict(matryoshka),
    )


def chat_template_of(processor: Any) -> str:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise PueError("the checkpoint has no chat template", "add one (chat_template.jinja) to the checkpoint")
    return template


def render_user_turn(processor: Any, user: str, assistant_prefix: str, system: str | None = None) -> str:
    """The user turn (after the recipe's system turn, if any) through the checkpoint's chat template with the
    generation prompt, plus the prefix; the user string must come out verbatim."""
    before = [] if system is None else [{"role": "system", "content": system}]
    for content in (user, [{"type": "text", "text": user}]):
        rendered = _render(processor, [*before, {"role": "user", "content": content}])
        if rendered is not None and user in rendered and (system is None or system in rendered):
            return rendered + assistant_prefix
    raise PueError("the checkpoint's chat template does not render the recipe's user string verbatim")


def render_user_parts(processor: Any, user: str, assistant_prefix: str, system: str | None = None) -> str:
    """The user string as content parts (`<image>` → an image part, the text around it → text parts) through the
    chat template, plus the prefix. The template must render one image placeholder per image part and every text
    part verbatim, in order."""
    parts: list[dict[str, str]] = []
    for index, piece in enumerate(user.split(RECIPE_IMAGE)):
        if index:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    before = [] if system is None else [{"role": "system", "content": system}]
    rendered = _render(processor, [*before, {"role": "user", "content": parts}])
    placeholder = image_placeholder(processor)
    texts = [part["text"] for part in parts if part["type"] == "text"]
    if rendered is None or rendered.count(placeholder) != user.count(RECIPE_IMAGE) or not _in_order(rendered, texts):
        raise PueError(
            "the checkpoint's chat template does not render the recipe's content parts (image parts as "
            f"{placeholder!r}, text parts verbatim)",
            'use "content": "string" for templates that take the user string as is',
        )
    if system is not None and system not in rendered:
        raise PueError("the checkpoint's chat template does not render the recipe's system turn")
    return rendered + assistant_prefix


def _render(processor: Any, messages: list[dict[str, Any]]) -> str | None:
    try:
        return processor.tokenizer.apply_chat_template(
            messages, chat_template=chat_template_of(processor), tokenize=False, add_generation_prompt=True
        )
    except PueError:
        raise
    except Exception:  # a template that wants the other content form
        return None


def _in_order(text: str, pieces: list[str]) -> bool:
    at = 0
    for piece in pieces:
        found = text.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def render_prompts(processor: Any, recipe: Recipe) -> dict[str, str]:
    """Fully rendered templates for the manifest: {text} and the image placeholder left in."""
    if recipe.content == "parts":
        return {
            kind: render_user_parts(processor, recipe.user[kind], recipe.assistant_prefix, recipe.system)
            for kind in recipe.user
        }
    image_token = image_placeholder(processor)
    return {
        kind: render_user_turn(
            processor, recipe.user[kind].replace(RECIPE_IMAGE, image_token), recipe.assistant_prefix, recipe.system
        )
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


def check_embedding_dim(recipe: Recipe | dict[str, Any], hidden: int, wanted: int | None) -> int:
    """The output dimension of a bundle: the model's width, or a Matryoshka cut the recipe allows."""
    if wanted is None or wanted == hidden:
        return hidden
    matryoshka = recipe.get("matryoshka") if isinstance(recipe, dict) else recipe.matryoshka
    name = recipe.get("name") if isinstance(recipe, dict) else recipe.name
    if not matryoshka:
        raise PueError(
            f"embedding dimension {wanted} requested, but the recipe '{name}' allows only the model's {hidden}",
            'embeddings may be cut only where the model was trained for it (a recipe with "matryoshka")',
        )
    low = int(matryoshka["min_dim"])
    if not low <= wanted <= hidden:
        raise PueError(
            f"embedding dimension {wanted} is outside the recipe's Matryoshka range {low}..{hidden}",
            f"choose a dimension from {low} to {hidden}",
        )
    return int(wanted)
