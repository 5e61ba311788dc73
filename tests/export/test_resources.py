"""The resource plan of an 8 B LLaVA-NeXT (E5-V: CLIP-L/14-336 + Llama-3-8B), from the config on the meta device."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from pue.export.resources import plan_export  # noqa: E402

GiB = 1024**3


def e5v_8b_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=128256 - 1,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )


def expected_parameters() -> tuple[int, int]:
    """Parameter arithmetic written out by hand (biases included where the modules have them)."""
    h_v, i_v, layers_v, patches = 1024, 4096, 24, (336 // 14) ** 2
    vision_layer = 4 * (h_v * h_v + h_v) + 2 * (2 * h_v) + (h_v * i_v + i_v) + (i_v * h_v + h_v)
    vision = h_v + 3 * 14 * 14 * h_v + (patches + 1) * h_v + 2 * h_v + layers_v * vision_layer + 2 * h_v
    h, inter, layers, vocab, kv = 4096, 14336, 32, 128256, 1024
    projector = (h_v * h + h) + (h * h + h)
    newline = h
    text_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    text = vocab * h + layers * text_layer + h
    head = vocab * h
    total = vision + projector + newline + text + head
    return total, total - head


def test_8b_plan_matches_parameter_arithmetic():
    from transformers import LlavaNextForConditionalGeneration

    total, exported = expected_parameters()
    plan = plan_export(
        e5v_8b_config(), LlavaNextForConditionalGeneration, dtype="float32", device="cpu", available=24 * GiB
    )
    assert plan.parameters == total
    assert plan.exported_parameters == exported
    assert 8.0e9 < total < 8.5e9
    assert plan.checkpoint_bytes["float32"] == 4 * total
    assert plan.checkpoint_bytes["float16"] == 2 * total
    assert plan.bundle_bytes == 4 * exported
    # torch's copy and the exporter's protobuf copy are both on the host: 2 W + margin > 24 GB
    assert plan.peak_host_bytes >= 4 * total + 4 * exported
    assert not plan.fits
    assert any("--dtype float16" in note for note in plan.notes)


def test_8b_fp16_on_cuda_plan():
    from transformers import LlavaNextForConditionalGeneration

    total, exported = expected_parameters()
    plan = plan_export(
        e5v_8b_config(), LlavaNextForConditionalGeneration, dtype="float16", device="cuda", available=128 * GiB
    )
    assert plan.bundle_bytes == 2 * exported
    assert plan.peak_device_bytes >= 2 * total
    assert plan.fits
    assert any("GPU" in line for line in plan.lines())
