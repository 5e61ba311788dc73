"""FLOPs per patch: the config count against hand arithmetic (8 B LLaVA-NeXT), against an independent count from
the checkpoint's weight shapes (tiny presets), and against the bundle's own ONNX graphs."""

from __future__ import annotations

import json

import pytest

from pue.benchmarks.flops import (
    bundle_crops,
    decoder_flops,
    graph_flops,
    image_sequence_length,
    patch_flops,
    vision_flops,
)
from pue.bundle import read_manifest

# llama3-llava-next-8b / E5-V: CLIP ViT-L/14-336 and Llama-3-8B.
LLAVA_NEXT_8B = {
    "model_type": "llava_next",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128320,
    },
}


def test_llava_next_8b_is_about_20_tflop_per_tile():
    sequence = 1176 + 24  # E5-V geometry: 1,176 image tokens in a 1,200-token prompt
    count = patch_flops(LLAVA_NEXT_8B, crops=3, image_tokens=1176, sequence_length=sequence)
    # decoder by hand: per layer q,o 4096x4096, k,v 4096x1024, MLP 3 x 4096x14336, attention 4·S²·4096;
    # the last layer: k,v for every token, q,o and the MLP for the pooled token only
    weights_per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    last = 2 * sequence * 2 * 4096 * 1024 + 2 * (2 * 4096 * 4096 + 3 * 4096 * 14336)
    decoder = 31 * (2 * sequence * weights_per_layer + 4 * sequence**2 * 4096) + last
    assert count.decoder == decoder
    # vision by hand, per crop: 577 tokens (576 patches + CLS), 23 of 24 layers (feature layer -2)
    tokens = 577
    layer = 2 * tokens * (4 * 1024 * 1024 + 2 * 1024 * 4096) + 4 * tokens**2 * 1024
    patch_embedding = 2 * 576 * (3 * 14 * 14) * 1024
    projector = 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert count.vision == 3 * (patch_embedding + 23 * layer + projector)
    assert 17e12 < count.total < 21e12  # "about 20 TFLOP per tile"
    assert round(count.total / 1e12, 2) == 18.15  # 18.68 with the full last layer


def test_vision_counts_layers_up_to_the_feature_layer():
    config = json.loads(json.dumps(LLAVA_NEXT_8B))
    last = vision_flops({**config, "vision_feature_layer": -1}, crops=1)
    second_last = vision_flops(config, crops=1)
    config["vision_feature_layer"] = [-2, -5]  # multi-layer features: the projector reads a wider input
    multi = vision_flops(config, crops=1)
    assert last > second_last
    assert multi > second_last


def test_missing_sizes_take_the_defaults():
    explicit = {
        "text_config": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        }
    }
    implicit = {"text_config": {"model_type": "llama"}}
    assert decoder_flops(implicit, 100) == decoder_flops(explicit, 100)


def _weight_shapes(checkpoint):
    from safetensors import safe_open

    shapes = {}
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                shapes[name] = list(handle.get_slice(name).get_shape())
    return shapes


def _count_from_weights(checkpoint, crops, sequence):
    """2 x weights x tokens for every linear layer and the patch convolution, plus the attention products,
    read from the checkpoint's tensors (not from the config parser under test)."""
    config = json.loads((checkpoint / "config.json").read_text())
    shapes = _weight_shapes(checkpoint)
    vision, text = config["vision_config"], config["text_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    has_cls = vision.get("model_type") == "clip_vision_model"
    tokens = patches + int(has_cls)
    needed = vision["num_hidden_layers"] - 1  # feature layer -2
    linear = lambda name: len(shapes[name]) == 2 and name.endswith(".weight")  # noqa: E731
    tower = sum(
        2 * tokens * shape[0] * shape[1]
        for name, shape in shapes.items()
        if "vision_tower" in name
        and ".layers." in name
        and linear(name)
        and int(name.split(".layers.")[1].split(".")[0]) < needed
    )
    tower += needed * 4 * tokens**2 * vision["hidden_size"]
    conv = next(shape for name, shape in shapes.items() if "patch_embedding.weight" in name)
    tower += 2 * patches * conv[0] * conv[1] * conv[2] * conv[3]
    selected = patches if has_cls else tokens
    projector = sum(2 * selected * s[0] * s[1] for n, s in shapes.items() if "multi_modal_projector" in n and linear(n))
    last = text["num_hidden_layers"] - 1  # runs for the pooled token only, but for its keys and values

    def rows(name):
        layer = int(name.split(".layers.")[1].split(".")[0])
        return sequence if layer < last or "k_proj" in name or "v_proj" in name else 1

    decoder = sum(
        2 * rows(n) * s[0] * s[1] for n, s in shapes.items() if "language_model" in n and ".layers." in n and linear(n)
    )
    decoder += last * 4 * sequence**2 * text["hidden_size"]
    return crops * (tower + projector), decoder


@pytest.mark.parametrize(
    ("arch", "preset", "crops", "image_tokens"), [("llava_next", "ci", 2, 528), ("llava", "ci", 1, 256)]
)
def test_tiny_presets_match_an_independent_count_from_the_weights(tiny_checkpoint, arch, preset, crops, image_tokens):
    checkpoint = tiny_checkpoint(arch, preset)
    sequence = image_tokens + 27
    config = json.loads((checkpoint / "config.json").read_text())
    count = patch_flops(config, crops, image_tokens, sequence)
    vision, decoder = _count_from_weights(checkpoint, crops, sequence)
    assert (count.vision, count.decoder) == (vision, decoder)


def test_graph_count_equals_config_count(fp32_bundle, tiny_checkpoint):
    bundle = fp32_bundle("llava_next", "ci")
    manifest = read_manifest(bundle)
    sequence = image_sequence_length(bundle, manifest)
    assert sequence > manifest.tokens_per_image
    from_graph = graph_flops(bundle, manifest)
    config = json.loads((tiny_checkpoint("llava_next", "ci") / "config.json").read_text())
    from_config = patch_flops(config, bundle_crops(manifest), manifest.tokens_per_image, sequence)
    assert from_graph.source == "graph" and from_config.source == "config"
    assert (from_graph.vision, from_graph.decoder) == (from_config.vision, from_config.decoder)
    assert from_graph.to_dict()["total"] == from_graph.vision + from_graph.decoder
