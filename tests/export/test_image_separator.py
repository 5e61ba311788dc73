"""How a chat template joins several image parts of one user turn (`image_separator`), and the runtime's prompt of
k images against the template rendered with k image parts (issue 16)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pue.bundle import Prompts
from pue.export.recipe import image_separator, render_user_turn
from pue.export.tiny_tokenizer import CHAT_TEMPLATE, make_tokenizer
from pue.runtime.prompts import PromptTokenizer

#: LLaVA-1.5-hf style: every image part first, each as "<image>\n", then the text parts.
IMAGES_FIRST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}USER: "
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
#: renders string content only
STRING_TEMPLATE = "{{ bos_token }}{% for m in messages %}USER: {{ m['content'] + '' }} {% endfor %}ASSISTANT:"
#: every second image part gets a different joint: not one separator
IRREGULAR_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '|' if loop.index is even else '' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
)
TOKENS_PER_IMAGE = 5
RECIPE_IMAGE = "<image>\nSummary above image in one word: "
RECIPE_COMPOSED = '<image>Modify this image with "{text}", describe modified image in one word: '


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    hf = make_tokenizer()
    directory = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(directory)
    return hf, directory / "tokenizer.json"


def processor(hf, template: str) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=hf, chat_template=template, image_token="<image>")


@pytest.mark.parametrize(
    ("template", "expected"),
    [(CHAT_TEMPLATE, ""), (IMAGES_FIRST_TEMPLATE, "\n"), (STRING_TEMPLATE, None), (IRREGULAR_TEMPLATE, None)],
)
def test_separator_read_from_the_chat_template(tokenizer, template, expected):
    assert image_separator(processor(tokenizer[0], template)) == expected


@pytest.mark.parametrize("images", [1, 2, 4])
def test_runtime_ids_equal_the_template_rendered_with_k_image_parts(tokenizer, images):
    """The tiny checkpoints' template: k image parts then the recipe's text, tokenized the HF processor's way."""
    hf, path = tokenizer
    proc = processor(hf, CHAT_TEMPLATE)
    rendered = {
        "image": render_user_turn(proc, RECIPE_IMAGE, " \n"),
        "text": render_user_turn(proc, "{text}\nSummary above sentence in one word: ", " \n"),
        "composed": render_user_turn(proc, RECIPE_COMPOSED, " \n"),
    }
    prompts = Prompts(image_placeholder="<image>", image_separator=image_separator(proc), **rendered)
    runtime = PromptTokenizer(
        path, prompts, hf.convert_tokens_to_ids("<image>"), TOKENS_PER_IMAGE, max_seq_len=4096, pad_token_id=0
    )
    for recipe, kind, text in ((RECIPE_IMAGE, "image", None), (RECIPE_COMPOSED, "composed", "more stroma")):
        after = recipe.removeprefix("<image>").replace("{text}", text or "")
        parts = [{"type": "image"}] * images + [{"type": "text", "text": after}]
        by_template = hf.apply_chat_template(
            [{"role": "user", "content": parts}],
            chat_template=CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
        )
        expanded = (by_template + " \n").replace("<image>", "<image>" * TOKENS_PER_IMAGE)
        want = hf(expanded, add_special_tokens=False)["input_ids"]
        assert runtime.encode(kind, text, images=images)[0] == want
