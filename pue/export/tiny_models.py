"""Tiny, real Hugging Face checkpoints with deterministic random weights, for tests, demos and benchmarks.

`build_tiny_model` writes a checkpoint directory exactly like a published one (`save_pretrained` of the model as
safetensors, and of the processor with its image processor, tokenizer and chat template) that
`LlavaNextForConditionalGeneration` / `LlavaForConditionalGeneration` and `AutoProcessor` reload offline. Nothing
is downloaded: the tokenizer is a byte-level BPE trained on `pue/data/corpus.txt` at build time.

Presets (`ARCHITECTURES` x `PRESETS`):

- ``ci``: about 1 M parameters, CLIP-224 (llava_next, pinpoints [[224, 224]]: 2 crops, 528 image tokens per
  224 tile) or SigLIP-224 (llava: 256 image tokens).
- ``e5v``: llava_next only, about 1 M parameters in the E5-V geometry (CLIP-336, LLaVA-1.6 pinpoints: a 224
  tile becomes 3 crops and 1,176 image tokens).
- ``outliers``: ``ci`` with compensated activation outliers in every decoder block (norm gains divided out of the
  next projections: the function is unchanged, and smoothing undoes them exactly).
- ``gains-few``, ``gains-all``, ``massive``, ``vit-highnorm``: ``ci`` with outliers that change the function, as
  trained models carry them (uncompensated norm gains of 20/100/1000 in two or all blocks; massive activations on
  fixed tokens; high-norm vision tokens): see `pue.export.tiny_outliers`. The Qwen-VL archs take ``gains-few``,
  ``gains-all`` and ``massive`` on their ``ci`` preset (not ``vit-highnorm``: `UNSUPPORTED` says why).
- ``bench``: 50-60 M parameters; llava_next in the E5-V geometry, llava with SigLIP-384 (729 image tokens);
  qwen3_vl: about 360 M parameters, Qwen3-VL-2B's layer shapes at reduced depth (`pue.export.tiny_qwen`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pue.errors import OutputExistsError, PueError
from pue.export.tiny_qwen import (
    QWEN_ARCHITECTURES,
    QWEN_BENCH_ARCHITECTURES,
    QWEN_NO_VIT_HIGHNORM,
    QWEN_OUTLIER_PRESETS,
    QWEN_PRESETS,
)
from pue.export.tiny_tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, make_tokenizer

ARCHITECTURES = ("llava_next", "llava", *QWEN_ARCHITECTURES)
OUTLIER_PRESETS = {
    "outliers": "compensated",
    "gains-few": "gains-few",
    "gains-all": "gains-all",
    "massive": "massive",
    "vit-highnorm": "vit-highnorm",
}
PRESETS = ("ci", "e5v", "bench", *OUTLIER_PRESETS)

#: (arch, preset) pairs that are refused, with the reason.
UNSUPPORTED = {
    ("llava", "e5v"): "e5v is the LLaVA-NeXT geometry (CLIP-336 anyres); use --arch llava_next or another preset",
    **{
        (arch, preset): (
            f"Qwen-VL presets so far: ci and {', '.join(QWEN_OUTLIER_PRESETS)} (every arch),"
            f" bench ({', '.join(QWEN_BENCH_ARCHITECTURES)})"
        )
        for arch in QWEN_ARCHITECTURES
        for preset in PRESETS
        if preset not in QWEN_PRESETS or (preset == "bench" and arch not in QWEN_BENCH_ARCHITECTURES)
    },
    **{
        (arch, "vit-highnorm"): f"vit-highnorm does not transfer to Qwen-VL towers: {QWEN_NO_VIT_HIGHNORM}"
        for arch in QWEN_ARCHITECTURES
    },
}

LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class _Spec:
    """Sizes of one (arch, preset): the vision tower, the language model and the anyres layout."""

    image_size: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    pinpoints: list = field(default_factory=list)  # llava_next only
    patch_size: int = 14
    max_position_embeddings: int = 4096


_TINY = {
    "vision_hidden": 64,
    "vision_intermediate": 256,
    "vision_layers": 4,
    "vision_heads": 4,
    "text_hidden": 64,
    "text_intermediate": 192,
    "text_layers": 6,
    "text_heads": 4,
    "text_kv_heads": 2,
}
_BENCH = {
    "vision_hidden": 384,
    "vision_intermediate": 1536,
    "vision_layers": 12,
    "vision_heads": 6,
    "text_hidden": 512,
    "text_intermediate": 1408,
    "text_layers": 10,
    "text_heads": 8,
    "text_kv_heads": 4,
}

_SPECS: dict[tuple[str, str], _Spec] = {
    ("llava_next", "ci"): _Spec(image_size=224, pinpoints=[[224, 224]], **_TINY),
    ("llava_next", "e5v"): _Spec(image_size=336, pinpoints=LLAVA_16_PINPOINTS, **_TINY),
    ("llava_next", "bench"): _Spec(image_size=336, pinpoints=LLAVA_16_PINPOINTS, **_BENCH),
    ("llava", "ci"): _Spec(image_size=224, **_TINY),
    ("llava", "bench"): _Spec(image_size=384, **_BENCH),
    **{("llava_next", preset): _Spec(image_size=224, pinpoints=[[224, 224]], **_TINY) for preset in OUTLIER_PRESETS},
    **{("llava", preset): _Spec(image_size=224, **_TINY) for preset in OUTLIER_PRESETS},
}


def _check_names(arch: str, preset: str) -> _Spec | None:
    if arch not in ARCHITECTURES:
        raise PueError(f"unknown architecture '{arch}'; available: {', '.join(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise PueError(f"unknown preset '{preset}'; available: {', '.join(PRESETS)}")
    if (arch, preset) in UNSUPPORTED:
        offered = ", ".join(p for p in PRESETS if (arch, p) not in UNSUPPORTED)
        raise PueError(
            f"preset '{preset}' for arch '{arch}' is not offered: {UNSUPPORTED[(arch, preset)]}"
            f" (presets for {arch}: {offered})"
        )
    return _SPECS.get((arch, preset))  # None for the Qwen-VL presets (`tiny_qwen`)


def build_tiny_model(
    output: str | Path,
    arch: str = "llava_next",
    preset: str = "ci",
    seed: int = 0,
    overwrite: bool = False,
    outlier_gain: float = 100.0,
) -> Path:
    """Write a tiny `arch` checkpoint for `preset` to `output` (atomically) and return its path.

    The same `seed` gives byte-identical weights. An existing `output` is refused unless `overwrite`.
    `outlier_gain` (20, 70, 100 or 1000) is the norm gain of the `gains-few` / `gains-all` presets.
    """
    spec = _check_names(arch, preset)
    from pue.export.tiny_outliers import NORM_GAINS

    if outlier_gain not in NORM_GAINS:
        offered = ", ".join(f"{g:g}" for g in NORM_GAINS)
        raise PueError(f"outlier gain {outlier_gain:g} is not offered", f"choose one of {offered}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PueError(f"seed must be a non-negative integer, got {seed!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(str(output))
    output.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        model, processor, info = _build(arch, preset, spec, seed, outlier_gain)
        with _quiet_progress():
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
        (tmp / "pue_tiny.json").write_text(json.dumps(info, indent=2) + "\n")
        _replace(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


@contextlib.contextmanager
def _quiet_progress():
    """Hide transformers' "Writing model shards" bar while saving (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _replace(tmp: Path, output: Path, overwrite: bool) -> None:
    """Move the finished `tmp` directory to `output`, replacing an existing one only when `overwrite`."""
    if not (output.exists() or output.is_symlink()):
        os.replace(tmp, output)
        return
    if not overwrite:
        raise OutputExistsError(str(output))
    trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    old = trash / "old"
    os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        os.replace(old, output)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- building


def _build(arch: str, preset: str, spec: _Spec | None, seed: int, outlier_gain: float = 100.0):
    import torch
    import transformers

    import pue

    if spec is None:
        from pue.export.tiny_qwen import build_qwen

        model, processor, details = build_qwen(arch, seed, "bench" if preset == "bench" else "ci")
        outlier_info = _plant(preset, model, processor.tokenizer, seed, outlier_gain)
        info = {
            "arch": arch,
            "preset": preset,
            "seed": seed,
            "param_count": sum(p.numel() for p in model.parameters()),
            "pue_version": pue.__version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__.split("+")[0],
            **details,
        }
        if outlier_info is not None:
            info["outliers"] = outlier_info
        return model, processor, info
    tokenizer = make_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = _make_config(arch, spec, tokenizer, image_token_id)

    model_class = (
        transformers.LlavaNextForConditionalGeneration
        if arch == "llava_next"
        else transformers.LlavaForConditionalGeneration
    )
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.float().eval()
    outlier_info = _plant(preset, model, tokenizer, seed, outlier_gain)

    processor = _make_processor(arch, spec, tokenizer)
    params = {id(p): p.numel() for p in model.parameters()}
    info = {
        "arch": arch,
        "preset": preset,
        "seed": seed,
        "param_count": sum(params.values()),
        "pue_version": pue.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "image_size": spec.image_size,
        "image_tokens_per_tile": {str(t): _image_tokens(arch, spec, processor, t) for t in (224, spec.image_size)},
    }
    if outlier_info is not None:
        info["outliers"] = outlier_info
    return model, processor, info


def _plant(preset: str, model, tokenizer, seed: int, outlier_gain: float) -> dict | None:
    """Plant the outliers of an outlier preset (`OUTLIER_PRESETS`) into `model`; what was planted, or None."""
    if preset not in OUTLIER_PRESETS:
        return None
    from pue.export.tiny_outliers import plant

    return plant(OUTLIER_PRESETS[preset], model, tokenizer, seed, gain=outlier_gain)


def _image_tokens(arch: str, spec: _Spec, processor, tile: int) -> int:
    """Image tokens the processor inserts for a square `tile` (llava: every image is resized to image_size)."""
    side = spec.image_size // spec.patch_size
    if arch == "llava":
        return side * side
    return processor._get_number_of_features(tile, tile, spec.image_size, spec.image_size) - 1  # minus CLS


def _make_config(arch: str, spec: _Spec, tokenizer, image_token_id: int):
    import transformers

    vocab_size = -(-len(tokenizer) // 64) * 64
    text_kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": "float32",
    }
    vision_kwargs = {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "dtype": "float32",
    }
    if arch == "llava_next":
        vision = transformers.CLIPVisionConfig(
            projection_dim=spec.vision_hidden, hidden_act="quick_gelu", **vision_kwargs
        )
        text = transformers.LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **text_kwargs)
        side = spec.image_size // spec.patch_size
        config = transformers.LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_token_id,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            image_grid_pinpoints=[list(p) for p in spec.pinpoints],
            image_seq_length=side * side,
            tie_word_embeddings=False,
            dtype="float32",
        )
    else:
        vision = transformers.SiglipVisionConfig(vision_use_head=False, **vision_kwargs)
        text = transformers.Qwen2Config(
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False, **text_kwargs
        )
        side = spec.image_size // spec.patch_size
        config = transformers.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_token_id,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="full",  # SigLIP has no CLS token
            vision_feature_layer=-2,
            image_seq_length=side * side,
            tie_word_embeddings=False,
            dtype="float32",
        )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def _make_processor(arch: str, spec: _Spec, tokenizer):
    import transformers

    size = spec.image_size
    if arch == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=[list(p) for p in spec.pinpoints],
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        return transformers.LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=spec.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=CHAT_TEMPLATE,
            image_token=IMAGE_TOKEN,
        )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size},  # SigLIP squashes any image to image_size x image_size, no crop
        crop_size={"height": size, "width": size},  # read by LlavaProcessor._get_num_multimodal_tokens
        do_center_crop=False,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
