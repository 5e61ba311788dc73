"""PromptTokenizer against transformers: the same chat template rendered and tokenized the HF way must give the
same ids (image placeholder expanded like the HF processor, no second BOS)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pue.bundle import Prompts
from pue.errors import BundleError, InputError
from pue.runtime.prompts import PromptTokenizer, PromptTruncationWarning


def row_of(prompt_tokenizer: PromptTokenizer, kind: str, text, index: int = 0, truncate: bool = True) -> list[int]:
    """One row through the public path the Embedder takes: encode, then one truncation warning per call."""
    row, truncated = prompt_tokenizer.encode(kind, text, index, truncate)
    prompt_tokenizer.warn_truncated([index] if truncated else [], 1)
    return row


def rows_of(prompt_tokenizer: PromptTokenizer, kind: str, texts: list[str]) -> list[list[int]]:
    encoded = [prompt_tokenizer.encode(kind, text, index) for index, text in enumerate(texts)]
    prompt_tokenizer.warn_truncated([i for i, (_, truncated) in enumerate(encoded) if truncated], len(texts))
    return [row for row, _ in encoded]

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role']=='user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
RECIPE = {
    "image": "<image>\nSummary above image in one word: ",
    "text": "{text}\nSummary above sentence in one word: ",
    "composed": '<image>Modify this image with "{text}", describe modified image in one word: ',
}
ASSISTANT_PREFIX = " \n"
TOKENS_PER_IMAGE = 6
MAX_SEQ_LEN = 4096
CORPUS = [
    "The nuclei are enlarged and hyperchromatic with prominent nucleoli.",
    "Summary above image in one word: tumor.",
    "Summary above sentence in one word: necrosis.",
    "Modify this image with more inflammation, describe modified image in one word.",
    "An H&E stained section of colon adenocarcinoma with glandular architecture.",
    "Lymphocytes infiltrate the stroma; mitoses are frequent.",
    "Invasive ductal carcinoma of the breast, grade 3.",
    "Normal liver parenchyma with portal tracts and central veins.",
    "Squamous cell carcinoma shows keratin pearls and intercellular bridges.",
    "USER: describe the tissue. ASSISTANT: benign.",
    "Fibrosis, edema and hemorrhage are seen in the lamina propria.",
    "Immunohistochemistry for Ki-67 highlights proliferating cells.",
] * 3


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>", "<unk>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # Like Llama's tokenizer: encoding with special tokens prepends BOS (the trap the runtime must avoid).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<image>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("tokenizer")
    hf.save_pretrained(directory)
    return hf, directory / "tokenizer.json"


def render(hf, user: str) -> str:
    messages = [{"role": "user", "content": user}]
    return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + ASSISTANT_PREFIX


def manifest_prompts(hf) -> Prompts:
    return Prompts(
        image=render(hf, RECIPE["image"]),
        text=render(hf, RECIPE["text"]),
        composed=render(hf, RECIPE["composed"]),
        image_placeholder="<image>",
    )


def make(hf_tokenizer, max_seq_len: int = MAX_SEQ_LEN) -> PromptTokenizer:
    hf, path = hf_tokenizer
    return PromptTokenizer(
        path,
        manifest_prompts(hf),
        image_token_id=hf.convert_tokens_to_ids("<image>"),
        tokens_per_image=TOKENS_PER_IMAGE,
        max_seq_len=max_seq_len,
        pad_token_id=hf.pad_token_id,
    )


def hf_ids(hf, rendered: str) -> list[int]:
    """What the HF processor feeds the model: the placeholder repeated tokens_per_image times, then tokenized."""
    expanded = rendered.replace("<image>", "<image>" * TOKENS_PER_IMAGE)
    return hf(expanded, add_special_tokens=False)["input_ids"]


TEXTS = [
    "a short caption",
    "",
    "Zellkern — 細胞 🧫 naïve façade, Ångström",
    "line one\nline two\n\n\tindented\r\n",
    "  leading and trailing spaces  ",
    "{text} stays literal, and so does {0} and {{braces}}",
    "special strings </s> and <s> and <pad> are tokenized as the reference does",
    "USER: a fake turn ASSISTANT:",
    " ".join(CORPUS) * 4,  # very long, still under MAX_SEQ_LEN
]


def test_image_prompt_matches_transformers(hf_tokenizer):
    hf, _ = hf_tokenizer
    prompt_tokenizer = make(hf_tokenizer)
    ids = prompt_tokenizer.image_prompt()
    assert ids == hf_ids(hf, render(hf, RECIPE["image"]))
    assert ids.count(hf.convert_tokens_to_ids("<image>")) == TOKENS_PER_IMAGE
    assert ids[0] == hf.bos_token_id and ids[1] != hf.bos_token_id


def test_image_prompt_is_cached(hf_tokenizer):
    prompt_tokenizer = make(hf_tokenizer)
    calls = []
    real = prompt_tokenizer.tokenizer

    class Spy:
        def encode(self, *args, **kwargs):
            calls.append(args)
            return real.encode(*args, **kwargs)

    prompt_tokenizer.tokenizer = Spy()
    first = prompt_tokenizer.image_prompt()
    first.append(-1)  # callers get a copy
    assert prompt_tokenizer.image_prompt() == first[:-1]
    assert len(calls) == 1


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_text_prompt_matches_transformers(hf_tokenizer, text):
    hf, _ = hf_tokenizer
    ids = row_of(make(hf_tokenizer), "text", text)
    assert ids == hf(render(hf, RECIPE["text"].replace("{text}", text)), add_special_tokens=False)["input_ids"]
    assert ids[0] == hf.bos_token_id and ids[1] != hf.bos_token_id
    assert hf.convert_tokens_to_ids("<image>") not in ids


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_composed_prompt_matches_transformers(hf_tokenizer, text):
    hf, _ = hf_tokenizer
    ids = row_of(make(hf_tokenizer), "composed", text)
    assert ids == hf_ids(hf, render(hf, RECIPE["composed"].replace("{text}", text)))
    assert ids.count(hf.convert_tokens_to_ids("<image>")) == TOKENS_PER_IMAGE


def test_special_tokens_are_not_added_again(hf_tokenizer):
    """The BOS trap: the rendered prompt already starts with <s>; encoding with special tokens doubles it."""
    hf, _ = hf_tokenizer
    rendered = render(hf, RECIPE["text"].replace("{text}", "tumor"))
    doubled = hf(rendered, add_special_tokens=True)["input_ids"]
    assert doubled[:2] == [hf.bos_token_id, hf.bos_token_id]
    assert row_of(make(hf_tokenizer), "text", "tumor") == doubled[1:]


@pytest.mark.parametrize("kind", ["text", "composed"])
@pytest.mark.parametrize("text", ["look at <image> here", "<image>", "x<image>y"])
def test_text_with_image_placeholder_is_refused(hf_tokenizer, kind, text):
    with pytest.raises(InputError, match=r"item 3: .*image placeholder") as info:
        row_of(make(hf_tokenizer), kind, text, index=3)
    assert info.value.index == 3


def test_text_with_another_string_for_the_image_token_is_refused(hf_tokenizer, tmp_path):
    """A special token whose string differs from the placeholder but maps to the image id is refused too."""
    hf, path = hf_tokenizer
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.add_special_tokens(["<IMG>"])
    alias_path = tmp_path / "tokenizer.json"
    tokenizer.save(str(alias_path))
    alias_id = tokenizer.token_to_id("<IMG>")
    prompts = manifest_prompts(hf)
    prompts = Prompts(
        image=prompts.image.replace("<image>", "<IMG>"),
        text=prompts.text,
        composed=prompts.composed.replace("<image>", "<IMG>"),
        image_placeholder="<IMG>",
    )
    prompt_tokenizer = PromptTokenizer(alias_path, prompts, alias_id, TOKENS_PER_IMAGE, MAX_SEQ_LEN, hf.pad_token_id)
    with pytest.raises(InputError, match="item 1: .*<IMG>"):
        row_of(prompt_tokenizer, "composed", "an <IMG> inside", index=1)
    # The old "<image>" string is an ordinary special token here, not an image slot.
    assert alias_id not in row_of(prompt_tokenizer, "text", "an <image> inside")


def test_invalid_unicode_is_refused(hf_tokenizer):
    with pytest.raises(InputError, match="item 2: the text is not valid Unicode"):
        row_of(make(hf_tokenizer), "text", "broken \ud800 surrogate", index=2)


def test_non_string_is_refused(hf_tokenizer):
    with pytest.raises(InputError, match="item 0: expected a str, got int"):
        row_of(make(hf_tokenizer), "text", 42)


LONG_TEXT = " ".join(CORPUS)
MAX_SHORT = 64


@pytest.mark.parametrize("kind", ["text", "composed"])
def test_truncation_drops_the_end_of_the_text_and_keeps_the_suffix(hf_tokenizer, kind):
    hf, _ = hf_tokenizer
    prompt_tokenizer = make(hf_tokenizer, max_seq_len=MAX_SHORT)
    template = getattr(prompt_tokenizer.prompts, kind)
    prefix, suffix = template.split("{text}")
    with pytest.warns(PromptTruncationWarning, match=r"1 of 1 texts were longer than max_seq_len 64 .*items 5"):
        ids = row_of(prompt_tokenizer, kind, LONG_TEXT, index=5)
    assert MAX_SHORT - 3 <= len(ids) <= MAX_SHORT
    image_id = hf.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == (TOKENS_PER_IMAGE if kind == "composed" else 0)
    collapsed = [token for i, token in enumerate(ids) if token != image_id or ids[i - 1] != image_id]
    decoded = hf.decode(collapsed, skip_special_tokens=False)
    assert decoded.startswith(prefix) and decoded.endswith(suffix)
    kept = decoded[len(prefix) : len(decoded) - len(suffix)]
    assert 0 < len(kept) < len(LONG_TEXT) and LONG_TEXT.startswith(kept)
    # The result is exactly what the reference gives for the shortened text.
    assert ids == hf_ids(hf, template.replace("{text}", kept))


def test_truncation_warns_once_per_call_with_the_count(hf_tokenizer):
    prompt_tokenizer = make(hf_tokenizer, max_seq_len=MAX_SHORT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = rows_of(prompt_tokenizer, "text", [LONG_TEXT, "short", LONG_TEXT + " again"])
    truncation = [w for w in caught if issubclass(w.category, PromptTruncationWarning)]
    assert len(truncation) == 1
    assert "2 of 3 texts" in str(truncation[0].message) and "items 0, 2" in str(truncation[0].message)
    assert rows[1] == row_of(prompt_tokenizer, "text", "short")
    assert all(len(row) <= MAX_SHORT for row in rows)


def test_no_warning_without_truncation(hf_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows_of(make(hf_tokenizer), "composed", ["short", "", "also short"])


@pytest.mark.parametrize("kind", ["text", "composed"])
def test_truncate_false_raises_with_count_and_limit(hf_tokenizer, kind):
    hf, _ = hf_tokenizer
    full = len(row_of(make(hf_tokenizer), kind, LONG_TEXT))
    prompt_tokenizer = make(hf_tokenizer, max_seq_len=MAX_SHORT)
    with pytest.raises(InputError, match=rf"item 7: the prompt has {full} tokens, more than .* max_seq_len 64"):
        row_of(prompt_tokenizer, kind, LONG_TEXT, index=7, truncate=False)


def test_prompt_longer_than_limit_without_text_is_a_bundle_error(hf_tokenizer):
    with pytest.raises(BundleError, match="without any text"):
        row_of(make(hf_tokenizer, max_seq_len=8), "text", "some words to drop")
    with pytest.raises(BundleError, match="image prompt has"):
        make(hf_tokenizer, max_seq_len=8).image_prompt()


def test_pad_right_pads_with_the_pad_id(hf_tokenizer):
    hf, _ = hf_tokenizer
    prompt_tokenizer = make(hf_tokenizer)
    rows = [
        row_of(prompt_tokenizer, "text", "tumor"),
        prompt_tokenizer.image_prompt(),
        row_of(prompt_tokenizer, "text", ""),
    ]
    input_ids, attention_mask = prompt_tokenizer.pad(rows)
    lengths = [len(row) for row in rows]
    assert input_ids.shape == attention_mask.shape == (3, max(lengths))
    assert input_ids.dtype == attention_mask.dtype == np.int64
    assert attention_mask.sum(axis=1).tolist() == lengths
    for i, row in enumerate(rows):
        assert input_ids[i, : len(row)].tolist() == row
        assert (input_ids[i, len(row) :] == hf.pad_token_id).all()
        assert (attention_mask[i, : len(row)] == 1).all() and (attention_mask[i, len(row) :] == 0).all()
    # Same as the HF tokenizer's own right padding of the same prompts.
    texts = [hf.decode(row, skip_special_tokens=False) for row in rows]
    hf.padding_side = "right"
    padded = hf(texts, add_special_tokens=False, padding=True, return_tensors="np")
    np.testing.assert_array_equal(padded["input_ids"], input_ids)
    np.testing.assert_array_equal(padded["attention_mask"], attention_mask)


def test_pad_of_nothing_is_empty(hf_tokenizer):
    input_ids, attention_mask = make(hf_tokenizer).pad([])
    assert input_ids.shape == attention_mask.shape == (0, 0)


def test_mismatched_placeholder_is_a_bundle_error(hf_tokenizer):
    hf, path = hf_tokenizer
    prompts = manifest_prompts(hf)
    with pytest.raises(BundleError, match="tokenizes to"):
        PromptTokenizer(path, prompts, hf.convert_tokens_to_ids("<pad>"), TOKENS_PER_IMAGE, MAX_SEQ_LEN, 2)
    broken = Prompts(prompts.image, prompts.text.replace("{text}", ""), prompts.composed, "<image>")
    with pytest.raises(BundleError, match="text prompt holds 0"):
        PromptTokenizer(path, broken, hf.convert_tokens_to_ids("<image>"), TOKENS_PER_IMAGE, MAX_SEQ_LEN, 2)


def test_tokenizer_padding_and_truncation_settings_are_ignored(hf_tokenizer, tmp_path):
    """A tokenizer.json saved with its own padding/truncation must not change the ids."""
    hf, path = hf_tokenizer
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=5)
    tokenizer.enable_padding(length=300, pad_id=hf.pad_token_id, pad_token="<pad>")
    configured = tmp_path / "tokenizer.json"
    tokenizer.save(str(configured))
    image_id = hf.convert_tokens_to_ids("<image>")
    prompt_tokenizer = PromptTokenizer(
        configured, manifest_prompts(hf), image_id, TOKENS_PER_IMAGE, MAX_SEQ_LEN, hf.pad_token_id
    )
    assert row_of(prompt_tokenizer, "text", "tumor") == row_of(make(hf_tokenizer), "text", "tumor")


# --- rows of several images (issue 16) ------------------------------------------------------------------------


def make_multi(hf_tokenizer, separator: str | None = "\n", max_seq_len: int = MAX_SEQ_LEN) -> PromptTokenizer:
    hf, path = hf_tokenizer
    prompts = manifest_prompts(hf)
    prompts.image_separator = separator
    return PromptTokenizer(
        path, prompts, hf.convert_tokens_to_ids("<image>"), TOKENS_PER_IMAGE, max_seq_len, hf.pad_token_id
    )


@pytest.mark.parametrize("images", [1, 2, 4])
def test_k_image_prompts_join_placeholders_with_the_separator(hf_tokenizer, images):
    hf, _ = hf_tokenizer
    joined = "\n".join(["<image>"] * images)
    assert make_multi(hf_tokenizer).encode("image", None, images=images)[0] == hf_ids(
        hf, render(hf, RECIPE["image"].replace("<image>", joined))
    )
    composed = make_multi(hf_tokenizer).encode("composed", "more stroma", images=images)[0]
    rendered = render(hf, RECIPE["composed"].replace("<image>", joined, 1).replace("{text}", "more stroma"))
    assert composed == hf_ids(hf, rendered)
    assert composed.count(hf.convert_tokens_to_ids("<image>")) == images * TOKENS_PER_IMAGE


def test_a_bundle_without_separator_refuses_several_images(hf_tokenizer):
    prompt_tokenizer = make_multi(hf_tokenizer, separator=None)
    assert prompt_tokenizer.encode("image", None, images=1)[0] == make(hf_tokenizer).image_prompt()
    with pytest.raises(InputError, match=r"item 2: the row has 3 images; this bundle takes one image per row"):
        prompt_tokenizer.encode("composed", "x", index=2, images=3)


def test_images_past_max_seq_len_are_refused_with_the_count_never_truncated(hf_tokenizer):
    unlimited = make_multi(hf_tokenizer)
    fits = len(unlimited.encode("composed", "", images=2)[0]) + 3  # two images and a few tokens of text
    prompt_tokenizer = make_multi(hf_tokenizer, max_seq_len=fits)
    too_many = next(k for k in range(2, 50) if len(unlimited.encode("image", None, images=k)[0]) > fits)
    fitting = too_many - 1
    want = unlimited.encode("image", None, images=fitting)[0]
    assert prompt_tokenizer.encode("image", None, images=fitting)[0] == want
    with pytest.raises(
        InputError, match=rf"item 4: the row's {too_many} images take {too_many * TOKENS_PER_IMAGE} tokens"
    ):
        prompt_tokenizer.encode("image", None, index=4, images=too_many)
    assert prompt_tokenizer.max_images() == fitting and make_multi(hf_tokenizer, separator=None).max_images() == 1
    # a long text beside 2 images loses its end; the images stay whole
    ids, truncated = prompt_tokenizer.encode("composed", " ".join(CORPUS), index=0, images=2)
    assert truncated and len(ids) <= prompt_tokenizer.max_seq_len
    assert ids.count(prompt_tokenizer.image_token_id) == 2 * TOKENS_PER_IMAGE
    with pytest.raises(InputError, match=r"item 1: the row's 3 images"):
        prompt_tokenizer.encode("composed", "short", index=1, images=3)
