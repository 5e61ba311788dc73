"""Activation outliers planted into tiny random checkpoints so that they behave like trained models.

Trained LLMs and ViTs carry outliers that are part of their function, and they are what breaks naive INT8:

- ``outliers`` (the compensated case, kept for comparison): a few residual channels get RMSNorm gains of 100-400 in
  every block and the projections that read them are divided by the same gains. The function is unchanged, so
  smoothing recovers it exactly; real models are not like that.
- ``gains-few`` / ``gains-all``: three residual channels get fixed RMSNorm gains of 20, 100 and 1000 (input and
  post-attention norms) in two blocks / in every block, read by the ordinary, uncompensated projections: the
  function changes, as in trained models whose outlier channels carry information.
- ``massive``: "massive activations" (Sun et al. 2024): the MLP of one early block writes one residual channel at
  ~2000x the median residual magnitude on fixed token positions (the BOS token and the ``:`` of the chat template's
  turn markers), and the residual stream carries it to the end, where it acts as an attention sink.
- ``vit-highnorm``: high-norm tokens of a ViT without registers (Darcet et al. 2024): three patch positions of the
  vision tower carry hidden states ~100x the median token norm, up to the layer the projector reads (un-normalised
  in LLaVA), so the projector's input has them.

Each planter returns a record (channels, positions, gains, measured ratios) written to ``pue_tiny.json`` and an
``ablate`` description tests use to show the outliers matter. Values are fixed (seeded choice of channels and
positions; fixed gains and target ratios) so that results are comparable across seeds.
"""

from __future__ import annotations

from typing import Any

COMPENSATED_CHANNELS = 3
COMPENSATED_GAIN_RANGE = (100.0, 400.0)
NORM_GAINS = (20.0, 100.0, 1000.0)
MASSIVE_RATIO = 2000.0  # trigger tokens' value on the massive channel / median |residual| at the writing block
MASSIVE_TRIGGERS = ("<s>", ":")
HIGH_NORM_POSITIONS = 3
HIGH_NORM_RATIO = 100.0  # high-norm tokens' hidden-state norm / median token norm, at the layer the projector reads

KINDS = ("compensated", "gains-few", "gains-all", "massive", "vit-highnorm")


def plant(kind: str, model: Any, tokenizer: Any, seed: int) -> dict[str, Any]:
    """Plant outliers of `kind` into `model` in place; return what was planted."""
    if kind == "compensated":
        return plant_compensated(model, seed)
    if kind in ("gains-few", "gains-all"):
        return plant_norm_gains(model, seed, every_block=kind == "gains-all")
    if kind == "massive":
        return plant_massive_activations(model, tokenizer, seed)
    if kind == "vit-highnorm":
        return plant_vision_high_norm_tokens(model, seed)
    raise ValueError(f"unknown outlier kind {kind!r}; known: {', '.join(KINDS)}")


def _generator(seed: int, salt: int) -> Any:
    import torch

    return torch.Generator().manual_seed(10_000 * salt + seed)


def _pick(count: int, size: int, generator: Any, exclude: tuple[int, ...] = ()) -> list[int]:
    import torch

    order = [int(i) for i in torch.randperm(size, generator=generator) if int(i) not in exclude]
    return sorted(order[:count])


def plant_compensated(model: Any, seed: int) -> dict[str, Any]:
    """Gains on the norms, divided out of the projections that read them: the function is unchanged."""
    import torch

    gen = _generator(seed, 1)
    text = model.model.language_model
    channels = _pick(COMPENSATED_CHANNELS, text.config.hidden_size, gen)
    idx = torch.tensor(channels)
    lo, hi = (torch.log(torch.tensor(v)) for v in COMPENSATED_GAIN_RANGE)
    gains = []
    with torch.no_grad():
        for layer in text.layers:
            layer_gains = []
            for norm, readers in _norms_and_readers(layer):
                gain = torch.exp(lo + (hi - lo) * torch.rand(len(channels), generator=gen))
                norm.weight[idx] *= gain
                for linear in readers:
                    linear.weight[:, idx] /= gain
                layer_gains.append([round(float(g), 1) for g in gain])
            gains.append(layer_gains)
    return {"kind": "compensated", "mechanism": "rmsnorm-gain, compensated", "channels": channels, "gains": gains}


def plant_norm_gains(model: Any, seed: int, every_block: bool) -> dict[str, Any]:
    """Fixed gains (20, 100, 1000) on three residual channels of the norms of two blocks or of every block."""
    import torch

    gen = _generator(seed, 2)
    text = model.model.language_model
    channels = _pick(len(NORM_GAINS), text.config.hidden_size, gen)
    layers = list(range(len(text.layers))) if every_block else [1, len(text.layers) // 2 + 1]
    gains = torch.tensor(NORM_GAINS)
    with torch.no_grad():
        for index in layers:
            for norm, _ in _norms_and_readers(text.layers[index]):
                norm.weight[torch.tensor(channels)] *= gains
    return {
        "kind": "gains-all" if every_block else "gains-few",
        "mechanism": "rmsnorm-gain, uncompensated",
        "channels": channels,
        "gains": list(NORM_GAINS),
        "layers": layers,
        "norms": ["input_layernorm", "post_attention_layernorm"],
    }


def plant_massive_activations(model: Any, tokenizer: Any, seed: int) -> dict[str, Any]:
    """One early block's MLP writes one residual channel at ~MASSIVE_RATIO x the median on trigger tokens.

    The trigger tokens' embeddings get a shared direction d; one intermediate unit of block 1's MLP reads d through
    gate and up (SiLU(b s) * b s is large only where s = x.d is large), and its down_proj column writes channel c.
    Its scale is set from a probe pass so that the trigger tokens reach the ratio; other tokens stay near normal.
    """
    import torch

    gen = _generator(seed, 3)
    text = model.model.language_model
    hidden = text.config.hidden_size
    writer = 1
    channel = _pick(1, hidden, gen)[0]
    unit = _pick(1, text.config.intermediate_size, gen)[0]
    direction = torch.randn(hidden, generator=gen)
    direction /= direction.norm()
    triggers = [tokenizer.convert_tokens_to_ids(t) for t in MASSIVE_TRIGGERS]
    embed = text.embed_tokens.weight
    mlp = text.layers[writer].mlp
    with torch.no_grad():
        typical = float(embed.norm(dim=1).median())
        for token in triggers:
            embed[token] += direction * 4.0 * typical
        mlp.gate_proj.weight[unit] = direction * 4.0
        mlp.up_proj.weight[unit] = direction * 4.0
        mlp.down_proj.weight[:, unit] = 0.0
        mlp.down_proj.weight[channel, unit] = 1.0
        probe = _probe_ids(tokenizer)
        residual, value = _residual_after(model, probe, writer, channel)
        is_trigger = torch.isin(probe, torch.tensor(triggers))
        median = float(residual.abs().median())
        current = float(value[is_trigger].abs().mean())
        mlp.down_proj.weight[channel, unit] = MASSIVE_RATIO * median / current
        residual, value = _residual_after(model, probe, writer, channel)
        median = float(residual.abs().median())
        reached = [round(float(v) / median, 1) for v in value[is_trigger].abs()]
        others = float(value[~is_trigger].abs().max()) / median
    return {
        "kind": "massive",
        "mechanism": "down_proj writes one residual channel on trigger tokens",
        "layer": writer,
        "channel": channel,
        "intermediate_unit": unit,
        "trigger_tokens": list(MASSIVE_TRIGGERS),
        "trigger_token_ids": triggers,
        "ratio_to_median_at_trigger_tokens": reached,
        "max_ratio_at_other_tokens": round(others, 1),
    }


def plant_vision_high_norm_tokens(model: Any, seed: int) -> dict[str, Any]:
    """A large shared vector on a few patch positions' position embeddings: those tokens' hidden states stay
    ~HIGH_NORM_RATIO x the median norm up to the layer the projector reads (a pre-LN residual stream keeps them)."""
    import torch

    gen = _generator(seed, 4)
    vision = model.model.vision_tower.vision_model
    embeddings = vision.embeddings
    positions_total = embeddings.position_embedding.weight.shape[0]
    has_cls = getattr(embeddings, "class_embedding", None) is not None
    positions = _pick(HIGH_NORM_POSITIONS, positions_total, gen, exclude=(0,) if has_cls else ())
    direction = torch.randn(embeddings.position_embedding.weight.shape[1], generator=gen)
    direction /= direction.norm()
    layer = model.config.vision_feature_layer
    size = model.config.vision_config.image_size
    probe = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        norms = _vision_norms(model, probe, layer)
        scale = HIGH_NORM_RATIO * float(norms.median())
        embeddings.position_embedding.weight[torch.tensor(positions)] += direction * scale
        norms = _vision_norms(model, probe, layer)
        median = float(norms.median())
        reached = [round(float(norms[:, p].mean()) / median, 1) for p in positions]
    return {
        "kind": "vit-highnorm",
        "mechanism": "large position-embedding vector on a few patch positions",
        "positions": positions,
        "position_includes_cls": has_cls,
        "vision_feature_layer": layer,
        "ratio_to_median_token_norm": reached,
    }


# ----------------------------------------------------------------------------------------------------- probes


def _norms_and_readers(layer: Any) -> tuple[tuple[Any, tuple[Any, ...]], ...]:
    attention, mlp = layer.self_attn, layer.mlp
    return (
        (layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj)),
        (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
    )


def _probe_ids(tokenizer: Any) -> Any:
    import torch

    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Lymph node with metastatic carcinoma.\nSummary above sentence in one word: "}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return torch.tensor(tokenizer(rendered + " \n", add_special_tokens=False)["input_ids"])


def _residual_after(model: Any, ids: Any, layer: int, channel: int) -> tuple[Any, Any]:
    """The residual stream after decoder block `layer` for one prompt, and its values on `channel`."""
    text = model.model.language_model
    out = text(input_ids=ids[None], output_hidden_states=True)
    residual = out.hidden_states[layer + 1][0]
    return residual, residual[:, channel]


def _vision_norms(model: Any, pixels: Any, layer: int) -> Any:
    """Per-token hidden-state norms at `layer` of the vision tower (what the projector reads)."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[layer].norm(dim=-1)
