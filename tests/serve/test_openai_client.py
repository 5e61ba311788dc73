"""The official `openai` client against the server: texts, images and composed queries, every encoding."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from serve_helpers import API_KEY, MODEL, alone, data_url, decode_url

from pue.runtime import Query
from pue.runtime.prompts import PromptTokenizer

# Rows embedded in a shared batch agree with the row embedded alone to float rounding, not bitwise, on this CPU:
# onnxruntime's fp32 kernels sum in a different order for other batch and sequence shapes (measured max 6e-8).
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def vectors(response) -> np.ndarray:
    """The rows of a response; an explicit encoding_format="base64" leaves decoding to the caller (the client only
    decodes the base64 it asked for by default), as little-endian float32."""
    assert [item.index for item in response.data] == list(range(len(response.data)))
    rows = [
        np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.asarray(e, np.float32)
        for e in (item.embedding for item in response.data)
    ]
    return np.stack(rows).astype(np.float32)


def prompt_tokens(offline, kinds_texts) -> int:
    prompts = PromptTokenizer.for_bundle(offline.bundle_dir, offline.manifest)
    return sum(len(prompts.encode(kind, text)[0]) for kind, text in kinds_texts)


TEXTS = ["invasive ductal carcinoma", "normal colon mucosa with goblet cells", ""]


@pytest.mark.parametrize("encoding", [None, "float", "base64"])
def test_texts_in_every_encoding_match_the_embedder_alone(client, offline, encoding):
    kwargs = {} if encoding is None else {"encoding_format": encoding}  # None: the client's default, base64
    response = client.embeddings.create(model=MODEL, input=TEXTS, **kwargs)
    expected = alone(offline, [Query(text=t) for t in TEXTS])
    got = vectors(response)
    assert got.shape == (3, offline.dimension)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert response.model == MODEL and response.object == "list"
    tokens = prompt_tokens(offline, [("text", t) for t in TEXTS])
    assert response.usage.prompt_tokens == tokens == response.usage.total_tokens


def test_a_single_string_is_one_row(client, offline):
    response = client.embeddings.create(model=MODEL, input="stroma", encoding_format="float")
    assert np.abs(vectors(response)[0] - offline.embed([Query(text="stroma")])[0]).max() <= TOLERANCE


def test_image_and_composed_through_messages(client, offline, patches):
    image = patches[0]
    expected = alone(offline, [Query(image=image), Query(image=image, text="as IHC"), Query(text="as IHC")])
    contents = [
        [{"type": "image_url", "image_url": {"url": data_url(image)}}],
        [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": "as IHC"}],
        "as IHC",
    ]
    for content, want, kind in zip(contents, expected, ["image", "composed", "text"], strict=True):
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "encoding_format": "float"}
        response = client.post("/embeddings", body=body, cast_to=openai.types.CreateEmbeddingResponse)
        assert len(response.data) == 1
        assert np.abs(vectors(response)[0] - want).max() <= TOLERANCE
        assert response.usage.prompt_tokens == prompt_tokens(offline, [(kind, "as IHC" if kind != "image" else None)])


def test_images_through_infinity_modality(client, offline, patches):
    formats = ["PNG", "JPEG", "TIFF", "WEBP"]
    urls = [data_url(patches[i % len(patches)], fmt) for i, fmt in enumerate(formats)]
    response = client.embeddings.create(model=MODEL, input=urls, extra_body={"modality": "image"})
    got = vectors(response)
    # the server decodes exactly what Pillow decodes from the same bytes (JPEG/WebP are lossy: compare decoded)

    expected = alone(offline, [Query(image=decode_url(url)) for url in urls])
    assert np.abs(got - expected).max() <= TOLERANCE


def test_composed_batch_form_mixes_kinds(client, offline, patches):
    url = data_url(patches[1])
    items = [{"image": url, "text": "more stroma"}, {"image": url}, {"text": "more stroma"}, "glands"]
    response = client.embeddings.create(model=MODEL, input=items, encoding_format="base64")  # type: ignore[arg-type]
    expected = alone(
        offline,
        [
            Query(image=patches[1], text="more stroma"),
            Query(image=patches[1]),
            Query(text="more stroma"),
            Query(text="glands"),
        ],
    )
    assert np.abs(vectors(response) - expected).max() <= TOLERANCE


def test_models_list_and_retrieve(client):
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_client_errors_map_to_openai_exceptions(client, server):
    with pytest.raises(openai.NotFoundError) as wrong_model:
        client.embeddings.create(model="text-embedding-3-small", input=["x"])
    assert wrong_model.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as token_ids:
        client.embeddings.create(model=MODEL, input=[[1, 2, 3]])
    assert "send strings" in token_ids.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        wrong_key = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
        wrong_key.embeddings.create(model=MODEL, input="x")
