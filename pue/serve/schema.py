"""The body of `POST /v1/embeddings`: what clients send, parsed into rows, refused loudly when not understood.

Three forms, each a list of rows (a row is a text, an image, or both: the recipe's kinds text, image, composed):

* OpenAI: `input` a string or a list of strings (texts). Token-id arrays (LangChain's default) are refused.
  The batch form for composed queries: `input` a list of objects `{"image": DATA_URL, "text": STR}` (either key
  alone is an image or a text row); strings and objects may be mixed.
* Infinity: `modality: "image"` with `input` a list of data URLs (or one).
* vLLM: `messages`, one user message whose `content` is a string or parts (`image_url` with a data URL, `text`):
  one row per request. System turns, other roles, several images or texts, other part types and chat-template
  fields are refused: the bundle's recipe fixes the prompt.

Unknown fields are refused too (a field the server ignored would change nothing the client could see).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pue.serve.errors import bad_request, too_large
from pue.serve.limits import Limits, check_text

ENCODING_FORMATS = ("float", "base64")
MODALITIES = ("text", "image")
KNOWN_FIELDS = frozenset({"model", "input", "messages", "modality", "encoding_format", "dimensions", "user"})
# vLLM's chat-embedding fields: each changes the prompt, which the bundle's recipe fixes.
TEMPLATE_FIELDS = frozenset(
    {
        "chat_template",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "mm_processor_kwargs",
        "truncate_prompt_tokens",
    }
)


@dataclass(frozen=True)
class RowSpec:
    """One row as sent: a text, an image source string (not yet decoded), or both; `param` names it in errors."""

    param: str
    text: str | None = None
    image: str | None = None

    @property
    def kind(self) -> str:
        if self.image is not None and self.text is not None:
            return "composed"
        return "image" if self.image is not None else "text"


@dataclass(frozen=True)
class EmbeddingRequest:
    rows: list[RowSpec]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None


def parse_request(body: Any, limits: Limits) -> EmbeddingRequest:
    """Rows and options of one request body (already JSON-decoded); a 400 (413 for too many inputs) otherwise."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(body)}")
    template = sorted(TEMPLATE_FIELDS & body.keys())
    if template:
        raise bad_request(
            f"{template[0]} is not supported: the bundle's recipe fixes the prompt template",
            param=template[0],
            code="unsupported_field",
        )
    unknown = sorted(body.keys() - KNOWN_FIELDS)
    if unknown:
        raise bad_request(
            f"unknown field {unknown[0]!r} (this server reads: {', '.join(sorted(KNOWN_FIELDS))})",
            param=unknown[0],
            code="unknown_field",
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, got {_json_type(model)}", param="model")
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODING_FORMATS:
        raise bad_request(f"encoding_format must be 'float' or 'base64', got {encoding!r}", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise bad_request(f"dimensions must be a positive integer, got {dimensions!r}", param="dimensions")
    has_input, has_messages = body.get("input") is not None, body.get("messages") is not None
    if has_input == has_messages:
        raise bad_request("send either input or messages" + (", not both" if has_input else ""), param="input")
    if has_messages:
        if body.get("modality") is not None:
            raise bad_request("modality goes with input, not with messages", param="modality")
        rows = [_message_row(body["messages"], limits)]
    else:
        rows = _input_rows(body["input"], body.get("modality"), limits)
    return EmbeddingRequest(rows=rows, model=model, encoding_format=encoding, dimensions=dimensions)


def _input_rows(value: Any, modality: Any, limits: Limits) -> list[RowSpec]:
    if modality is not None and modality not in MODALITIES:
        raise bad_request(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}", param="modality")
    if isinstance(value, str):
        items, single = [value], True
    elif isinstance(value, list):
        items, single = value, False
    else:
        raise bad_request(f"input must be a string or a list, got {_json_type(value)}", param="input")
    if not items:
        raise bad_request("input is an empty list", param="input")
    if any(isinstance(item, (int, float)) and not isinstance(item, bool) or isinstance(item, list) for item in items):
        raise bad_request(
            "input holds token ids; this server tokenizes with the bundle's own tokenizer: send strings "
            "(LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))",
            param="input",
            code="token_ids_not_supported",
        )
    if len(items) > limits.max_inputs:
        raise too_large(f"input has {len(items)} items, more than this server's limit of {limits.max_inputs}", "input")
    rows = []
    for index, item in enumerate(items):
        param = "input" if single else f"input[{index}]"
        if isinstance(item, str):
            if modality == "image":
                rows.append(RowSpec(param, image=item))
            else:
                check_text(item, limits, param)
                rows.append(RowSpec(param, text=item))
        elif isinstance(item, dict) and modality is None:
            rows.append(_object_row(item, param, limits))
        else:
            wanted = "a data URL string" if modality == "image" else "a string or an {image, text} object"
            raise bad_request(f"{param}: expected {wanted}, got {_json_type(item)}", param=param)
    return rows


def _object_row(item: dict[str, Any], param: str, limits: Limits) -> RowSpec:
    extra = sorted(item.keys() - {"image", "text"})
    if extra:
        raise bad_request(f"{param}: unknown key {extra[0]!r} (an input object has 'image' and/or 'text')", param=param)
    text, image = item.get("text"), item.get("image")
    if text is None and image is None:
        raise bad_request(f"{param}: an input object needs 'image', 'text' or both", param=param)
    for key, value in (("text", text), ("image", image)):
        if value is not None and not isinstance(value, str):
            raise bad_request(f"{param}.{key} must be a string, got {_json_type(value)}", param=f"{param}.{key}")
    if text is not None:
        check_text(text, limits, f"{param}.text")
    return RowSpec(param, text=text, image=image)


def _message_row(messages: Any, limits: Limits) -> RowSpec:
    if not isinstance(messages, list) or len(messages) != 1:
        found = f"{len(messages)} messages" if isinstance(messages, list) else _json_type(messages)
        raise bad_request(
            f"messages must hold exactly one user message (the recipe's prompt), got {found}", param="messages"
        )
    message = messages[0]
    if not isinstance(message, dict):
        raise bad_request(f"messages[0] must be an object, got {_json_type(message)}", param="messages[0]")
    role = message.get("role")
    if role != "user":
        raise bad_request(
            f"messages[0] has role {role!r}: only a user message is embedded (the recipe supplies the rest)",
            param="messages[0].role",
        )
    extra = sorted(message.keys() - {"role", "content"})
    if extra:
        raise bad_request(f"messages[0]: unsupported key {extra[0]!r}", param=f"messages[0].{extra[0]}")
    content = message.get("content")
    if isinstance(content, str):
        check_text(content, limits, "messages[0].content")
        return RowSpec("messages[0].content", text=content)
    if not isinstance(content, list) or not content:
        raise bad_request("messages[0].content must be a string or a non-empty list of parts", param="messages[0]")
    texts, images = [], []
    for number, part in enumerate(content):
        param = f"messages[0].content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            check_text(part["text"], limits, param)
        elif kind == "image_url":
            images.append(_image_url(part.get("image_url"), param))
        else:
            raise bad_request(
                f"{param}: expected a part of type 'text' (with a string text) or 'image_url', got {kind!r}",
                param=param,
            )
    if len(images) > 1 or len(texts) > 1:
        raise bad_request(
            f"messages[0].content holds {len(images)} images and {len(texts)} texts; the recipe embeds at most one "
            "of each per row (send several rows through input)",
            param="messages[0].content",
        )
    return RowSpec("messages[0].content", text=texts[0] if texts else None, image=images[0] if images else None)


def _image_url(value: Any, param: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise bad_request(f"{param}.image_url must be an object with a string url", param=f"{param}.image_url")
    return url


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)
