"""The decoder's last layer computed for the pooled token only equals the full last layer, for left and right
padding and both pooling rules; unsupported language models keep the full layer and say why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pue.export.architectures.decoder import EmbeddingDecoder
from pue.export.architectures.pooled_layer import pooled_last_layer_support


def load(checkpoint, arch):
    import transformers

    cls = (
        transformers.LlavaNextForConditionalGeneration
        if arch == "llava_next"
        else transformers.LlavaForConditionalGeneration
    )
    model = cls.from_pretrained(checkpoint).eval()
    model.model.language_model.set_attn_implementation("eager")
    return model


def decoders(model, pool_token_id=None):
    base = model.model
    make = lambda pooled: EmbeddingDecoder(  # noqa: E731
        base.language_model,
        base.get_input_embeddings(),
        image_token_id=7,
        pool_token_id=pool_token_id,
        pooled_last_layer=pooled,
    ).eval()
    return make(True), make(False)


@pytest.mark.parametrize("arch", ["llava_next", "llava"])
def test_pooled_last_layer_matches_the_full_layer(tiny_checkpoint, arch):
    model = load(tiny_checkpoint(arch, "ci"), arch)
    fast, full = decoders(model)
    assert fast.last_layer_mode == "pooled token only" and full.last_layer_mode.startswith("full sequence")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 200, (4, 12), generator=generator)
    ids[1, 2:6] = 7  # an image row: 4 image tokens
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # right padding
    mask[3, :5] = 0  # left padding
    features = torch.randn(4, 4, model.config.text_config.hidden_size, generator=generator)
    with torch.no_grad():
        a, b = fast(ids, mask, features), full(ids, mask, features)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert torch.allclose(a.norm(dim=-1), torch.ones(4), atol=1e-5)

    ids[:, 9] = 11  # pooling on the token before an <emb>-style marker
    fast, full = decoders(model, pool_token_id=11)
    with torch.no_grad():
        assert torch.allclose(fast(ids, mask, features), full(ids, mask, features), atol=1e-5)


def test_unsupported_models_keep_the_full_layer(tiny_checkpoint):
    model = load(tiny_checkpoint("llava_next", "ci"), "llava_next")
    assert pooled_last_layer_support(model.model.language_model) is None
    assert "layers" in pooled_last_layer_support(nn.Linear(2, 2))
    lm = model.model.language_model
    lm.layers[-1].self_attn.q_norm = nn.Identity()  # Qwen3-style per-head norms
    try:
        assert "q/k" in pooled_last_layer_support(lm)
        decoder = EmbeddingDecoder(lm, model.model.get_input_embeddings(), 7, None)
        assert decoder.last_layer is None and "q/k" in decoder.last_layer_mode
    finally:
        del lm.layers[-1].self_attn.q_norm
