"""Tiny checkpoints whose outliers behave like trained models' (issue 13): each fixture class plants what it says,
keeps its embeddings distinguishable, and its outliers matter to the function (removing them moves embeddings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pue.data import patch_set  # noqa: E402
from pue.export import ReferenceEmbedder  # noqa: E402

pytestmark = pytest.mark.slow
TEXTS = ["tumor", "benign stroma", "Lymph node with metastatic carcinoma in the subcapsular sinus."]
CLASSES = ("gains-few", "gains-all", "massive", "vit-highnorm")
# the Qwen-VL outlier presets (no vit-highnorm: `tiny_qwen.QWEN_NO_VIT_HIGHNORM`), one arch per class here (the
# others are measured by scripts/fidelity_matrix.py); the planters reach them through the same per-arch accessors
QWEN_FIXTURES = [("qwen3_vl", "massive"), ("qwen2_5_vl", "gains-few")]
FIXTURES = [(arch, preset) for arch in ("llava_next", "llava") for preset in CLASSES] + QWEN_FIXTURES


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tiny_checkpoint):
    """The session's checkpoints (seed 0, as the outlier bundles' parents); a reference of the module's own, since
    test_outliers_matter_to_the_function changes its weights (and puts them back)."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(arch: str, preset: str):
        if (arch, preset) not in cache:
            out = tiny_checkpoint(arch, preset)  # built once per session, shared with the outlier-report tests
            info = json.loads((out / "pue_tiny.json").read_text())["outliers"]
            reference = ReferenceEmbedder.load(out, tile_size=224)
            images = patch_set("heldout")
            cache[(arch, preset)] = (info, reference, images, unit(reference.embed_images(images)))
        return cache[(arch, preset)]

    return get


def embed(reference, images) -> np.ndarray:
    return unit(np.concatenate([reference.embed_images(images), reference.embed_texts(TEXTS)]))


def ablation_subset(images: list) -> list:
    """Both stains, fewer tiles: the ablated model embeds these again."""
    ihc = [p for p in images if p.name.startswith("ihc")]
    return [p for p in images if not p.name.startswith("ihc")][:6] + ihc[:4]


def remove_outliers(model, info: dict) -> None:
    """Undo what the fixture planted, leaving everything else: gains back to 1, the writing unit silenced."""
    with torch.no_grad():
        if info["kind"] in ("gains-few", "gains-all"):
            text, channels = model.model.language_model, torch.tensor(info["channels"])
            for layer in info["layers"]:
                text.layers[layer].input_layernorm.weight[channels] /= info["gain"]
                text.layers[layer].post_attention_layernorm.weight[channels] /= info["gain"]
        elif info["kind"] == "massive":
            model.model.language_model.layers[info["layer"]].mlp.down_proj.weight[:, info["intermediate_unit"]] = 0
        elif info["kind"] == "vit-highnorm":
            mlp = model.model.vision_tower.encoder.layers[info["layer"]].mlp
            mlp.fc2.weight[:, info["intermediate_unit"]] = 0


@pytest.mark.parametrize(("arch", "preset"), FIXTURES, ids=[f"{a}-{p}" for a, p in FIXTURES])
def test_fixture_plants_its_outliers_and_stays_distinguishable(built, arch, preset):
    info, reference, images, patches = built(arch, preset)
    assert info["kind"] == preset
    if preset == "massive":  # >= 1000x the median residual value on the trigger tokens, written by one block
        assert min(info["ratio_to_median_at_trigger_tokens"]) >= 1000
    if preset == "vit-highnorm":
        assert min(info["ratio_to_median_token_norm"]) >= 50 and info["max_ratio_at_other_tokens"] < 5
    if preset.startswith("gains"):
        assert info["gain"] == 100.0 and len(info["channels"]) == 3
    pairwise = patches @ patches.T
    n = len(patches)
    assert (pairwise.sum() - n) / (n * (n - 1)) < 0.95  # held-out patches stay distinguishable


@pytest.mark.parametrize(("arch", "preset"), FIXTURES, ids=[f"{a}-{p}" for a, p in FIXTURES])
def test_outliers_matter_to_the_function(built, arch, preset):
    info, reference, images, _ = built(arch, preset)
    images = ablation_subset(images)
    before = embed(reference, images)
    saved = {k: v.clone() for k, v in reference.model.state_dict().items()}
    try:
        remove_outliers(reference.model, info)
        after = embed(reference, images)
    finally:
        reference.model.load_state_dict(saved)
    assert np.sum(before * after, axis=1).min() < 0.99


@pytest.mark.parametrize("arch", ["llava_next", "llava"])
@pytest.mark.parametrize("preset", ["gains-few", "gains-all"])
def test_norm_gains_are_planted_at_a_real_models_width(tiny_checkpoint, arch, preset):
    """Against the `ci` checkpoint of the same seed (the same random init): only the planted blocks' norms and their
    readers changed; the norms by the gain on the three channels, the readers' columns of those channels by the width
    ratio to a 4096-wide model, nothing else (the gain is not divided out: the function changes)."""
    from safetensors.torch import load_file

    from pue.export.tiny_outliers import REAL_WIDTH, width_scale

    planted_dir = tiny_checkpoint(arch, preset)
    info = json.loads((planted_dir / "pue_tiny.json").read_text())["outliers"]
    base, planted = (load_file(str(d / "model.safetensors")) for d in (tiny_checkpoint(arch, "ci"), planted_dir))
    width = next(v.shape[0] for k, v in base.items() if k.endswith("layers.0.input_layernorm.weight"))
    scale = width_scale(width)
    assert info["real_width"] == REAL_WIDTH and info["reader_column_scale"] == pytest.approx(scale, abs=1e-6)
    assert scale == pytest.approx(((width - 3) / (REAL_WIDTH - 3)) ** 0.5)
    assert info["amplified_share"] == pytest.approx(3 * 100**2 / (3 * 100**2 + REAL_WIDTH - 3), abs=1e-4)
    channels = torch.tensor(info["channels"])
    others = torch.tensor([c for c in range(width) if c not in info["channels"]])
    changed = {k for k in base if not torch.equal(base[k], planted[k])}
    readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    norms = ("input_layernorm", "post_attention_layernorm")
    for layer in info["layers"]:
        prefix = next(k for k in base if k.endswith(f"layers.{layer}.input_layernorm.weight")).rsplit("input_", 1)[0]
        for norm in norms:
            key = f"{prefix}{norm}.weight"
            assert torch.allclose(planted[key][channels], base[key][channels] * 100.0)
            assert torch.equal(planted[key][others], base[key][others])
            changed.discard(key)
        for reader in readers:
            key = f"{prefix}{reader}.weight"
            assert torch.allclose(planted[key][:, channels], base[key][:, channels] * scale)
            assert torch.equal(planted[key][:, others], base[key][:, others])
            changed.discard(key)
    assert not changed


FLOOR_FIXTURES = [(a, p) for a in ("llava_next", "llava") for p in ("gains-few", "gains-all", "massive")]
FLOOR_FIXTURES += [("llava_next", "vit-highnorm")]


@pytest.mark.parametrize(("arch", "preset"), FLOOR_FIXTURES, ids=[f"{a}-{p}" for a, p in FLOOR_FIXTURES])
def test_outlier_fixtures_pass_their_gate_in_bf16_arithmetic(fp32_bundle, heldout_dir, arch, preset):
    """Trained checkpoints are trained and served in bf16: a fixture that stands for one keeps its function under bf16
    rounding, with room left for INT8 (`pue-export floor`: clear), whatever its outliers do to 8-bit integers. The
    fixtures the suite exports (the Qwen ones: scripts/fidelity_matrix.py --modes floor, BENCHMARKS.md)."""
    from pue.calibration.rounding_floor import bundle_floor

    record = bundle_floor(fp32_bundle(arch, preset), heldout_dir)
    assert record["passed"] and record["verdict"] == "clear", record["overall"]
