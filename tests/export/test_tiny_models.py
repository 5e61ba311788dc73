"""Tiny checkpoints: build, reload offline, geometry, determinism, refusals and planted activation outliers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pue.errors import OutputExistsError, PueError  # noqa: E402
from pue.export.tiny_models import ARCHITECTURES, PRESETS, build_tiny_model  # noqa: E402
from pue.export.tiny_qwen import QWEN_ARCHITECTURES  # noqa: E402

# the LLaVA family here; the Qwen-VL presets are built and checked in test_qwen_vl.py (ci) and test_tiny_outliers.py
LLAVA_ARCHITECTURES = tuple(a for a in ARCHITECTURES if a not in QWEN_ARCHITECTURES)

# the trained-like outlier presets (gains-*, massive, vit-highnorm) have their own tests: test_tiny_outliers.py
BASE_PRESETS = ("ci", "e5v", "bench", "outliers")
SUPPORTED = [(a, p) for a in LLAVA_ARCHITECTURES for p in BASE_PRESETS if (a, p) != ("llava", "e5v")]
TINY_RANGE = (0.3e6, 3e6)
BENCH_RANGE = (50e6, 60e6)
# image tokens the processor inserts for one 224 x 224 tile
EXPECTED_IMAGE_TOKENS = {
    ("llava_next", "ci"): 528,
    ("llava_next", "outliers"): 528,
    ("llava_next", "e5v"): 1176,
    ("llava_next", "bench"): 1176,
    ("llava", "ci"): 256,
    ("llava", "outliers"): 256,
    ("llava", "bench"): 729,  # SigLIP-384: every image is resized to 384 x 384
}
PROMPT = "<image>\nSummary above image in one word: "
OUTLIER_RATIO = 50.0
OUTLIER_BLOCK_FRACTION = 0.75

_IHC_CANDIDATES = [
    Path(__file__).resolve().parents[3] / "shared" / "data" / "ihc.png",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ihc.png",
]


def _tile_224():
    """A real 224 x 224 IHC patch (colonic glands), else a shipped patch, else a synthetic stained-looking one."""
    from PIL import Image

    for path in _IHC_CANDIDATES:
        if path.is_file():
            with Image.open(path) as im:
                return im.convert("RGB").crop((144, 144, 368, 368))
    shipped = sorted((Path(__file__).resolve().parents[2] / "pue" / "data" / "patches").glob("**/*.jpg"))
    if shipped:  # real patches shipped with the package
        with Image.open(shipped[0]) as im:
            im = im.convert("RGB")
            scale = 224 / min(im.size)
            im = im.resize((max(224, round(im.width * scale)), max(224, round(im.height * scale))), Image.BICUBIC)
            left, top = (im.width - 224) // 2, (im.height - 224) // 2
            return im.crop((left, top, left + 224, top + 224))
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224]
    nuclei = (np.sin(xx / 7.0) * np.cos(yy / 9.0) > 0.6)[..., None]
    base = np.array([230, 170, 200]) + rng.normal(0, 12, (224, 224, 3))
    img = np.where(nuclei, np.array([90, 60, 150]) + rng.normal(0, 10, (224, 224, 3)), base)
    return Image.fromarray(np.clip(img, 0, 255).astype("uint8"))


@pytest.fixture(scope="module")
def measured(tiny_checkpoint):
    """Reload each checkpoint offline and run one real image prompt, with hooks on every decoder block.

    Bench checkpoints only run their vision side (image feature count), to keep this file fast.
    """
    cache: dict[tuple[str, str], dict] = {}

    def get(arch: str, preset: str) -> dict:
        if (arch, preset) not in cache:
            cache[(arch, preset)] = _run(tiny_checkpoint(arch, preset), arch, preset)
        return cache[(arch, preset)]

    return get


def _model_class(arch: str):
    return (
        transformers.LlavaNextForConditionalGeneration
        if arch == "llava_next"
        else (transformers.LlavaForConditionalGeneration)
    )


def _run(path: Path, arch: str, preset: str) -> dict:
    model, loading = _model_class(arch).from_pretrained(path, output_loading_info=True)
    model.eval()
    processor = transformers.AutoProcessor.from_pretrained(path)
    prompt = (
        processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
        + " \n"
    )
    inputs = processor(images=_tile_224(), text=prompt, return_tensors="pt")
    result = {
        "model": model,
        "processor": processor,
        "loading": loading,
        "prompt": prompt,
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "info": json.loads((path / "pue_tiny.json").read_text()),
    }
    with torch.no_grad():
        extra = {"image_sizes": inputs["image_sizes"]} if arch == "llava_next" else {}
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
    result["image_features"] = sum(f.shape[0] for f in features)
    if preset == "bench":  # the whole prompt through 54 M parameters is slow on CPU; the geometry is checked above
        return result

    ratios: dict[str, list[float]] = {"attn": [], "mlp": []}

    def hook(kind):
        def record(module, args):
            per_channel = args[0].detach()[0].abs().amax(dim=0)  # max |x| over tokens, per input channel
            ratios[kind].append(float(per_channel.max() / per_channel.median()))

        return record

    handles = []
    for layer in model.model.language_model.layers:
        handles.append(layer.self_attn.q_proj.register_forward_pre_hook(hook("attn")))
        handles.append(layer.mlp.gate_proj.register_forward_pre_hook(hook("mlp")))
    try:
        with torch.no_grad():  # the model itself checks that the image tokens match its image features
            out = model(**inputs, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    result["finite"] = bool(torch.isfinite(out.hidden_states[-1]).all() and torch.isfinite(out.logits).all())
    result["ratios"] = ratios
    return result


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(("arch", "preset"), SUPPORTED, ids=[f"{a}-{p}" for a, p in SUPPORTED])
def test_builds_and_reloads_offline(measured, tiny_checkpoint, arch, preset):
    path = tiny_checkpoint(arch, preset)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "pue_tiny.json"):
        assert (path / name).is_file(), name
    r = measured(arch, preset)
    model, processor, info = r["model"], r["processor"], r["info"]
    assert not any(r["loading"][k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.dtype == torch.float32

    # provenance
    import pue

    assert (info["arch"], info["preset"], info["seed"]) == (arch, preset, 0)
    assert info["pue_version"] == pue.__version__
    n_params = sum(p.numel() for p in model.parameters())
    assert info["param_count"] == n_params
    lo, hi = BENCH_RANGE if preset == "bench" else TINY_RANGE
    assert lo <= n_params <= hi, n_params

    # token ids line up between tokenizer, processor and model
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == model.config.image_token_index == image_id == processor.image_token_id
    assert tok.convert_tokens_to_ids("<emb>") not in (tok.unk_token_id, None)
    text_cfg = model.config.text_config
    assert text_cfg.vocab_size >= len(tok)
    assert text_cfg.pad_token_id == tok.pad_token_id is not None
    assert text_cfg.num_key_value_heads < text_cfg.num_attention_heads
    assert not model.config.tie_word_embeddings and not text_cfg.tie_word_embeddings
    assert text_cfg.max_position_embeddings >= 4096
    assert model.config.vision_feature_layer == -2
    assert tok.padding_side == "right"
    assert r["prompt"] == "<s>USER: " + PROMPT + " ASSISTANT: \n"

    # the processor expands <image> into exactly the features the model produces (the forward pass checks this)
    expected = EXPECTED_IMAGE_TOKENS[(arch, preset)]
    assert r["image_tokens"] == r["image_features"] == expected
    assert processor._get_num_multimodal_tokens(image_sizes=[[224, 224]]).num_image_tokens == [expected]
    assert info["image_tokens_per_tile"]["224"] == expected
    if preset != "bench":
        assert r["finite"]

    if arch == "llava_next":
        assert model.config.vision_feature_select_strategy == "default"
        assert processor.image_processor.size["shortest_edge"] == model.config.vision_config.image_size
    else:
        assert model.config.vision_feature_select_strategy == "full"
        assert processor.image_processor.size["height"] == model.config.vision_config.image_size


@pytest.mark.parametrize(("arch", "preset"), [("llava_next", "ci"), ("llava", "outliers")])
def test_same_seed_same_bytes(tiny_checkpoint, tmp_path, arch, preset):
    first = tiny_checkpoint(arch, preset)
    again = build_tiny_model(tmp_path / "again", arch=arch, preset=preset, seed=0)
    assert _sha(again) == _sha(first)
    assert (again / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    other = build_tiny_model(tmp_path / "other", arch=arch, preset=preset, seed=1)
    assert _sha(other) != _sha(first)


def test_llava_e5v_is_refused(tmp_path):
    with pytest.raises(PueError, match="e5v is the LLaVA-NeXT geometry") as exc:
        build_tiny_model(tmp_path / "x", arch="llava", preset="e5v")
    assert "\n" not in str(exc.value) and "llava_next" in str(exc.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_the_qwen_bench_preset_is_qwen3_vl_only(tmp_path, arch):
    with pytest.raises(PueError, match="bench \\(qwen3_vl\\)") as exc:
        build_tiny_model(tmp_path / "x", arch=arch, preset="bench")
    assert f"presets for {arch}: ci" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", QWEN_ARCHITECTURES)
def test_vit_highnorm_is_refused_for_qwen_with_the_reason(tmp_path, arch):
    with pytest.raises(PueError, match="vit-highnorm does not transfer to Qwen-VL towers") as exc:
        build_tiny_model(tmp_path / "x", arch=arch, preset="vit-highnorm")
    assert "2-D rotary positions only" in str(exc.value) and "\n" not in str(exc.value)
    offered = "ci, bench, gains-few" if arch == "qwen3_vl" else "ci, gains-few"
    assert f"presets for {arch}: {offered}, gains-all, massive)" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_the_qwen3_bench_preset_has_the_2b_layer_shapes():
    """Qwen3-VL-2B's config.json at reduced depth; its per-layer parameter counts, on the meta device."""
    import torch
    import transformers

    from pue.export.tiny_qwen import QWEN3_2B

    vision = transformers.Qwen3VLVisionConfig(**QWEN3_2B["vision"])
    text = {**QWEN3_2B["text"], "vocab_size": 1024, "rms_norm_eps": 1e-6}
    config = transformers.Qwen3VLConfig(vision_config=vision.to_dict(), text_config=text)
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3

    with torch.device("meta"):
        layer = qwen3.Qwen3VLTextDecoderLayer(config.text_config, 0)
        block = qwen3.Qwen3VLVisionBlock(config.vision_config)
    # q 2048x2048, k/v 2048x1024 (8 KV heads of 128), o 2048x2048, MLP 3 x 2048x6144, two norms, q/k norms of 128
    attention = 2 * 2048 * 2048 + 2 * 2048 * 1024
    assert sum(p.numel() for p in layer.parameters()) == attention + 3 * 2048 * 6144 + 2 * 2048 + 2 * 128
    # fused qkv and proj with biases, MLP 1024-4096-1024 with biases, two LayerNorms (gain and bias)
    mlp = 2 * 1024 * 4096 + 4096 + 1024
    assert sum(p.numel() for p in block.parameters()) == 4 * (1024 * 1024 + 1024) + mlp + 4 * 1024
    assert config.text_config.num_hidden_layers == 4 and config.vision_config.depth == 4
    assert config.vision_config.deepstack_visual_indexes == [1, 2, 3] and config.vision_config.out_hidden_size == 2048


@pytest.mark.parametrize(
    ("arch", "preset", "listed"),
    [
        ("mllama", "ci", ARCHITECTURES),
        ("llava_next", "huge", PRESETS),
    ],
)
def test_unknown_names_are_refused(tmp_path, arch, preset, listed):
    with pytest.raises(PueError) as exc:
        build_tiny_model(tmp_path / "x", arch=arch, preset=preset)
    message = str(exc.value)
    assert "\n" not in message and all(name in message for name in listed)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        build_tiny_model(out)
    assert (out / "stale.txt").read_text() == "old"

    assert build_tiny_model(out, overwrite=True) == out
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or trash dirs left behind


@pytest.mark.parametrize("arch", LLAVA_ARCHITECTURES)
def test_outliers_in_most_blocks(measured, arch):
    r = measured(arch, "outliers")
    assert r["finite"]
    for where, ratios in r["ratios"].items():
        n = len(ratios)
        assert n == r["model"].config.text_config.num_hidden_layers
        hits = sum(ratio >= OUTLIER_RATIO for ratio in ratios)
        assert hits >= OUTLIER_BLOCK_FRACTION * n, (where, ratios)


@pytest.mark.parametrize("arch", LLAVA_ARCHITECTURES)
def test_ci_has_no_outliers(measured, arch):
    for where, ratios in measured(arch, "ci")["ratios"].items():
        assert max(ratios) < OUTLIER_RATIO / 5, (where, ratios)
