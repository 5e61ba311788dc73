"""The tokenizer of the tiny checkpoints: a byte-level BPE trained at build time on `pue/data/corpus.txt`
(nothing is downloaded), with LLaVA's special tokens and a Vicuna-style chat template.
"""

from __future__ import annotations

import functools
from importlib import resources

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>", "<image>", "<emb>")
IMAGE_TOKEN = "<image>"
TOKENIZER_VOCAB_SIZE = 2048

#: Vicuna-style template (LLaVA-1.5/1.6 "USER: ... ASSISTANT:"). String content is rendered as is; list content
#: (processor-style ``[{"type": "image"}, {"type": "text", "text": ...}]``) renders images as ``<image>``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = namespace(text='') %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set content.text = content.text + '<image>' %}"
    "{% elif item['type'] == 'text' %}{% set content.text = content.text + item['text'] %}{% endif %}"
    "{% endfor %}{% set content = content.text %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ content }} "
    "{% elif message['role'] == 'user' %}USER: {{ content }} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ content }}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _corpus() -> list[str]:
    text = resources.files("pue.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process (deterministic: same corpus, same merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def make_tokenizer():
    """A `PreTrainedTokenizerFast` with the special tokens and the chat template of the tiny checkpoints."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<image>", "<emb>"],
        padding_side="right",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
