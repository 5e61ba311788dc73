"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints (random init, built offline) for tests and demos.

The configs are transformers 5's own classes at reduced sizes; the tokenizer is the project's tiny byte-level BPE
with Qwen's special tokens added and a ChatML template in Qwen2-VL's form (a default system turn, images as
``<|vision_start|><|image_pad|><|vision_end|>`` content parts). The image processor is `Qwen2VLImageProcessorPil`
with its defaults (min 56² / max 28²·1280 pixels): a 224 px tile stays 224 px, 16 × 16 patches, 64 tokens.

Preset ``ci``: vision width 64 (4 blocks; Qwen2.5-VL: windows of 112 px, full attention in blocks 1 and 3, so the
224 px tile has four windows), language model width 64, 4 layers, M-RoPE sections [2, 3, 3] of head_dim 16, and
q/k weights scaled so that attention depends on positions (`POSITION_GAIN`).

Qwen3-VL's ``ci`` preset keeps the released geometry at reduced width and depth: patch 16 × merge 2, the released
processor's pixel bounds (min 65,536: a 224 px tile becomes 256 px, 16 × 16 patches, 64 tokens) and its 0.5 mean
and std; a learned 8 × 8 position table that the tower interpolates bilinearly to the 16 × 16 grid; DeepStack
from vision blocks 1, 2 and 3 of 4 (three levels, added after decoder layers 0-2 of 4); interleaved M-RoPE
(sections [2, 3, 3] of head_dim 16, ``mrope_interleaved``). Its attention normalises q and k per head, so the
position gain goes on the q/k norms' weights instead of the projections, and is smaller (`QWEN3_NORM_GAIN`).

Qwen3-VL's ``bench`` preset has Qwen3-VL-2B's layer shapes at reduced depth (`QWEN3_2B`): vision width 1024 (MLP
4096, 16 heads, a 48 × 48 learned position table), mergers to 2048, language model width 2048 (MLP 6144, 16 heads,
8 KV heads, head_dim 128, M-RoPE sections [24, 20, 20] interleaved); 4 vision blocks (DeepStack from blocks 1-3, as
the released model takes blocks 5, 11 and 17 of 24) and 4 decoder layers instead of 24 and 28. About 360 M
parameters: the per-layer cost of the 2B model, so that per-token latency and int8 speed-ups carry over per layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

QWEN_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: `ci` with trained-like outliers in the language model (`pue.export.tiny_outliers`); not ``vit-highnorm``: see
#: `QWEN_NO_VIT_HIGHNORM`.
QWEN_OUTLIER_PRESETS = ("gains-few", "gains-all", "massive")
QWEN_PRESETS = ("ci", "bench", *QWEN_OUTLIER_PRESETS)
QWEN_NO_VIT_HIGHNORM = (
    "the LLaVA fixture marks patch positions through the tower's learned position table and its projector reads the "
    "un-normalised tower output; Qwen2/2.5-VL towers have no position table (2-D rotary positions only, so no "
    "content-independent marker), and Qwen-VL's patch merger normalises every token before its first linear, so "
    "high-norm tokens never reach the merger's linears as such"
)
#: The `bench` preset per architecture: only Qwen3-VL so far (issue 17's scaled benchmark).
QWEN_BENCH_ARCHITECTURES = ("qwen3_vl",)
QWEN_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|endoftext|>",
)

#: ChatML as Qwen2-VL renders it: a default system turn when the conversation has none, content parts in order.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen3-VL's template renders no default system turn (only one the conversation brings), otherwise the same.
QWEN3_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}",
    "",
)

_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
}
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
#: Qwen3-VL-2B's shapes (its config.json), at the `bench` preset's reduced depth.
QWEN3_2B = {
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
    },
    "vision": {
        "depth": 4,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [1, 2, 3],
    },
}
#: Gain on the language model's q and k weights. At random init (std 0.02) attention is nearly uniform and ignores
#: positions: 1-D instead of M-RoPE ids moved image embeddings by cosine 0.99997 only, so no gate could tell them
#: apart. With q and k × 4 (logits × 16) the same mistake gives 0.99 (measured on the ci preset).
POSITION_GAIN = 4.0
#: Qwen3-VL normalises q and k per head, so its logits do not shrink with the random weights (|q| = |k| = √head_dim
#: already) and its attention reads positions at gain 1: contiguous instead of interleaved sections moved image
#: embeddings to 0.995. The gain goes on the q/k norms' weights (logits scale with its square): ×1.5 widens that to
#: 0.95-0.99 while int8-dynamic still holds (mean 0.9992); ×4, the Qwen2 presets' value, made attention an argmax
#: that int8 noise flipped (mean 0.93, fp16 min 0.990). Measured on the ci preset, homie recipe, 256 px tiles.
QWEN3_NORM_GAIN = 1.5
#: Qwen3-VL's released image processor: patch 16, min 65,536 / max 16,777,216 pixels, mean and std 0.5.
QWEN3_IMAGE_PROCESSOR = {
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


class TinyQwenProcessor:
    """What `save_pretrained` of a Qwen processor writes, without constructing one (that needs torchvision)."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str = QWEN_CHAT_TEMPLATE) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (Path(path) / "chat_template.jinja").write_text(self.chat_template)


def build_qwen(arch: str, seed: int, preset: str = "ci") -> tuple[Any, TinyQwenProcessor, dict[str, Any]]:
    """(model, processor, info) of the tiny `arch` checkpoint for `preset`; the same seed gives the same weights."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from pue.export.tiny_tokenizer import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_TOKENS)}, replace_extra_special_tokens=False)
    template = QWEN3_CHAT_TEMPLATE if arch == "qwen3_vl" else QWEN_CHAT_TEMPLATE
    tokenizer.chat_template = template
    ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in QWEN_TOKENS}
    text = {
        **_TEXT,
        "vocab_size": -(-len(tokenizer) // 64) * 64,
        "rope_parameters": dict(_MROPE),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    tokens = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if arch == "qwen2_vl":
        vision = transformers.Qwen2VLVisionConfig(depth=4, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=4)
        config = transformers.Qwen2VLConfig(vision_config=vision.to_dict(), text_config=text, **tokens)
        model_class = transformers.Qwen2VLForConditionalGeneration
    elif arch == "qwen2_5_vl":
        vision = transformers.Qwen2_5_VLVisionConfig(
            depth=4,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=64,
            window_size=112,
            fullatt_block_indexes=[1, 3],
        )
        config = transformers.Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=text, **tokens)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    elif preset == "bench":
        vision = transformers.Qwen3VLVisionConfig(**QWEN3_2B["vision"])
        text = {**text, **QWEN3_2B["text"]}
        config = transformers.Qwen3VLConfig(vision_config=vision.to_dict(), text_config=text, **tokens)
        model_class = transformers.Qwen3VLForConditionalGeneration
    else:
        vision = transformers.Qwen3VLVisionConfig(
            depth=4,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1, 2, 3],
        )
        text = {**text, "head_dim": 16, "rope_parameters": {**_MROPE, "mrope_interleaved": True}}
        config = transformers.Qwen3VLConfig(vision_config=vision.to_dict(), text_config=text, **tokens)
        model_class = transformers.Qwen3VLForConditionalGeneration
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = model_class(config).float().eval()
    with torch.no_grad():  # attention that reads positions, as trained models' does (see POSITION_GAIN)
        for layer in model.model.language_model.layers:
            attention = layer.self_attn
            normed = hasattr(attention, "q_norm")  # Qwen3: per-head RMSNorm after q/k_proj would undo the gain
            gain = QWEN3_NORM_GAIN if normed else POSITION_GAIN
            (attention.q_norm if normed else attention.q_proj).weight.mul_(gain)
            (attention.k_norm if normed else attention.k_proj).weight.mul_(gain)
    image_processor = Qwen2VLImageProcessorPil(**(QWEN3_IMAGE_PROCESSOR if arch == "qwen3_vl" else {}))
    grid = image_processor.get_number_of_image_patches(224, 224)
    info = {
        "image_tokens_per_tile": {"224": grid // image_processor.merge_size**2},
        "special_tokens": ids,
    }
    return model, TinyQwenProcessor(tokenizer, image_processor, template), info
