"""Activation outliers planted into tiny random checkpoints so that they behave like trained models.

Trained LLMs and ViTs carry outliers that are part of their function, and they are what breaks naive INT8:

- ``outliers`` (the compensated case, kept for comparison): a few residual channels get RMSNorm gains of 100-400 in
  every block and the projections that read them are divided by the same gains. The function is unchanged, so
  smoothing recovers it exactly; real models are not like that.
- ``gains-few`` / ``gains-all``: three residual channels get a fixed RMSNorm gain of 20, 70, 100 or 1000 (input and
  post-attention norms) in two blocks / in every block, read by uncompensated projections: the function changes, as
  in trained models whose outlier channels carry information. The readers' columns of those channels are scaled
  once by the width ratio (`width_scale`), whatever the gain, so that three amplified channels weigh in a 64-wide
  tiny model what three weigh among a 7B model's 4096: at gain 100 they carry 88 % of each reader's output, as
  flat weights give them there. Without it, three of 64 channels at 100x carry 99.8 % of it, the other 61 sink
  below bf16's rounding, and the fixture fails in the precision trained checkpoints are trained and served in
  (measured: BENCHMARKS.md, "The `gains-*` fixtures at a real model's width").
- ``massive``: "massive activations" (Sun et al. 2024): the MLP of one early block writes one residual channel at
  ~2000x the median residual magnitude on fixed token positions (the BOS token, ``<|im_start|>`` in Qwen-VL whose
  templates render no BOS, and the ``:`` of the chat template's turn markers), and the residual stream carries it to
  the end, where it acts as an attention sink.
- ``vit-highnorm``: high-norm tokens of a ViT without registers (Darcet et al. 2024): three patch positions of the
  vision tower carry hidden states ~100x the median token norm, up to the layer the projector reads (un-normalised
  in LLaVA), so the projector's input has them; as in trained ViTs, the encoder layers after the writer attend to
  them (every head's softmax goes to them), so every patch token's features depend on them.

The decoder-side planters run on LLaVA, LLaVA-NeXT and the Qwen-VL archs (Llama-like decoder layers); what
differs per arch (the modules that write image features into the residual stream, the trigger tokens) comes from
small per-arch tables (`image_feature_writers`, `massive_triggers`). ``vit-highnorm`` is LLaVA-only
(`pue.export.tiny_qwen.QWEN_NO_VIT_HIGHNORM`).

Each planter returns a record (channels, positions, gains, measured ratios) written to ``pue_tiny.json`` and an
``ablate`` description tests use to show the outliers matter. Values are fixed (seeded choice of channels and
positions; fixed gains and target ratios) so that results are comparable across seeds.
"""

from __future__ import annotations

from typing import Any

COMPENSATED_CHANNELS = 3
COMPENSATED_GAIN_RANGE = (100.0, 400.0)
# the values a `gains-*` fixture takes (`--outlier-gain`), fixed for comparison; 70: the 60-80x of the checkpoint
# issue 13 describes (its FP16 bundle: min cosine 0.99968), to compare the fixture's conditioning with a real model's
NORM_GAINS = (20.0, 70.0, 100.0, 1000.0)
NORM_GAIN_CHANNELS = 3
#: the residual width of the checkpoints the fixtures stand for (LLaVA-1.5/NeXT-7B, Qwen3-VL-8B: 4096): the readers
#: of the amplified channels get their columns scaled by sqrt((width - 3) / (REAL_WIDTH - 3)), the share those
#: channels' inputs have in a reader's output at that width with flat weights (`plant_norm_gains`)
REAL_WIDTH = 4096
MASSIVE_RATIO = 2000.0  # trigger tokens' value on the massive channel / median |residual| at the writing block
#: the trigger tokens of the `massive` fixture per family: the prompt's first token (LLaVA's BOS; Qwen's chat
#: template renders no BOS, its prompts open on ``<|im_start|>``) and the ``:`` of the turn markers / the prompt
MASSIVE_TRIGGERS = ("<s>", ":")
QWEN_MASSIVE_TRIGGERS = ("<|im_start|>", ":")
HIGH_NORM_POSITIONS = 3
HIGH_NORM_RATIO = 100.0  # high-norm tokens' hidden-state norm / median token norm, at the layer the projector reads

KINDS = ("compensated", "gains-few", "gains-all", "massive", "vit-highnorm")


def plant(kind: str, model: Any, tokenizer: Any, seed: int, gain: float = 100.0) -> dict[str, Any]:
    """Plant outliers of `kind` into `model` in place; return what was planted (`gain`: `gains-*` only)."""
    if kind == "compensated":
        return plant_compensated(model, seed)
    if kind in ("gains-few", "gains-all"):
        return plant_norm_gains(model, seed, every_block=kind == "gains-all", gain=gain)
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


def plant_norm_gains(model: Any, seed: int, every_block: bool, gain: float = 100.0) -> dict[str, Any]:
    """A fixed gain (20, 70, 100 or 1000) on three residual channels of the norms of two blocks or of every block.

    The projections that read those norms (q/k/v, gate/up) get the three channels' columns scaled by `width_scale`,
    the same factor whatever the gain: the channels then carry the share of each reader's output they would carry
    among `REAL_WIDTH` channels with flat weights (88 % at gain 100, 99.9 % at 1000), not the one 3 of a tiny model's
    64 channels give them (99.8 % at 100). Nothing is compensated: the gain stays in the function.
    """
    import torch

    if gain not in NORM_GAINS:
        raise ValueError(f"outlier gain {gain} is not one of the fixed values {NORM_GAINS}")
    gen = _generator(seed, 2)
    text = model.model.language_model
    width = text.config.hidden_size
    channels = _pick(NORM_GAIN_CHANNELS, width, gen)
    layers = list(range(len(text.layers))) if every_block else [1, len(text.layers) // 2 + 1]
    scale = width_scale(width)
    index = torch.tensor(channels)
    with torch.no_grad():
        for layer in layers:
            for norm, readers in _norms_and_readers(text.layers[layer]):
                norm.weight[index] *= gain
                for linear in readers:
                    linear.weight[:, index] *= scale
    amplified = len(channels) * gain**2
    return {
        "kind": "gains-all" if every_block else "gains-few",
        "mechanism": "rmsnorm-gain, uncompensated",
        "channels": channels,
        "gain": gain,
        "layers": layers,
        "norms": ["input_layernorm", "post_attention_layernorm"],
        "real_width": REAL_WIDTH,
        "reader_column_scale": round(scale, 6),
        # what the amplified channels carry of a reader's output energy, inputs of unit scale and flat weights
        "amplified_share": round(amplified / (amplified + REAL_WIDTH - len(channels)), 4),
    }


def width_scale(width: int, channels: int = NORM_GAIN_CHANNELS) -> float:
    """The factor on the readers' columns of `channels` amplified channels in a `width`-wide model that gives them
    the share of a reader's output they have at `REAL_WIDTH` with flat weights (1 at that width or wider)."""
    return min(1.0, ((width - channels) / (REAL_WIDTH - channels)) ** 0.5)


def plant_massive_activations(model: Any, tokenizer: Any, seed: int) -> dict[str, Any]:
    """One early block's MLP writes one residual channel at ~MASSIVE_RATIO x the median on trigger tokens.

    The token embeddings get a reserved direction d (as trained models keep one for their attention sinks): only
    the trigger tokens carry it; the other embeddings and the projector's image features have none. One
    intermediate unit of block 1's MLP reads d through gate and up, so SiLU(b s) * b s is large on the trigger
    tokens only; its down_proj column writes channel c, scaled from a probe pass so that the trigger tokens reach
    the ratio.
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
    trigger_tokens = massive_triggers(model)
    triggers = [tokenizer.convert_tokens_to_ids(t) for t in trigger_tokens]
    embed = text.embed_tokens.weight
    mlp = text.layers[writer].mlp
    with torch.no_grad():
        typical = float(embed.norm(dim=1).median())
        embed -= torch.outer(embed @ direction, direction)
        embed[torch.tensor(triggers)] += direction * 5.0 * typical
        for projector in image_feature_writers(model):  # image features carry no d either
            projector.weight -= torch.outer(direction, direction @ projector.weight)
            projector.bias -= direction * float(projector.bias @ direction)
        mlp.gate_proj.weight[unit] = direction * 4.0
        mlp.up_proj.weight[unit] = direction * 4.0
        mlp.down_proj.weight[:, unit] = 0.0
        mlp.down_proj.weight[channel, unit] = 1.0
        probe = _probe_ids(tokenizer)
        is_trigger = torch.isin(probe, torch.tensor(triggers))
        residual, value = _residual_after(model, probe, writer, channel)
        mlp.down_proj.weight[channel, unit] = (
            MASSIVE_RATIO * float(residual.abs().median()) / float(value[is_trigger].abs().mean())
        )
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
        "trigger_tokens": list(trigger_tokens),
        "trigger_token_ids": triggers,
        "ratio_to_median_at_trigger_tokens": reached,
        "max_ratio_at_other_tokens": round(others, 1),
    }


def plant_vision_high_norm_tokens(model: Any, seed: int) -> dict[str, Any]:
    """High-norm tokens at a few patch positions of the vision tower, from its layer-1 MLP.

    A marker direction d is added to those positions' position embeddings; one fc1 unit of encoder layer 1 reads d
    with a threshold (its bias), so it fires on the marked positions only, and its fc2 column writes a large vector
    u into their residual stream, which carries it to the layer the projector reads (un-normalised in LLaVA). The
    scale comes from a probe pass, so that those tokens' norms reach HIGH_NORM_RATIO x the median token norm.
    """
    import torch

    gen = _generator(seed, 4)
    tower = model.model.vision_tower
    embeddings = tower.embeddings
    width = embeddings.position_embedding.weight.shape[1]
    has_cls = getattr(embeddings, "class_embedding", None) is not None
    positions = _pick(HIGH_NORM_POSITIONS, embeddings.position_embedding.weight.shape[0], gen, (0,) if has_cls else ())
    marker = torch.randn(width, generator=gen)
    marker /= marker.norm()
    target = torch.randn(width, generator=gen)
    target /= target.norm()
    writer = 1
    mlp = tower.encoder.layers[writer].mlp
    unit = _pick(1, mlp.fc1.weight.shape[0], gen)[0]
    layer = model.config.vision_feature_layer
    size = model.config.vision_config.image_size
    probe = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
    index = torch.tensor(positions)
    with torch.no_grad():
        hidden = _vision_hidden(model, probe, 0)
        embeddings.position_embedding.weight[index] += marker * 3.0 * float(hidden.norm(dim=-1).median())
        mlp.fc2.weight[:, unit] = target
        reads = _fc1_inputs(model, mlp, probe) @ marker  # what the unit would read, per token
        marked = torch.zeros(reads.shape[1], dtype=torch.bool)
        marked[index] = True  # a position's index is its token's (CLIP's CLS is position 0 and token 0)
        threshold = (float(reads[:, marked].min()) + float(reads[:, ~marked].max())) / 2
        mlp.fc1.weight[unit] = marker * 4.0
        mlp.fc1.bias[unit] = -4.0 * threshold
        norms = _scale_written(model, mlp, unit, probe, layer, positions)
        sink_layers = _plant_vision_sinks(model, probe, marked, writer, layer)
        norms = _scale_written(model, mlp, unit, probe, layer, positions)  # the sinks moved the marked tokens a bit
        median = float(norms.median())
        reached = [round(float(norms[:, p].mean()) / median, 1) for p in positions]
        others = float(norms[:, ~marked].max()) / median
    return {
        "kind": "vit-highnorm",
        "mechanism": "vision layer-1 MLP writes a large vector on a few patch positions",
        "positions": positions,
        "position_includes_cls": has_cls,
        "layer": writer,
        "intermediate_unit": unit,
        "vision_feature_layer": layer,
        "ratio_to_median_token_norm": reached,
        "max_ratio_at_other_tokens": round(others, 1),
        "sink_layers": sink_layers,
    }


SINK_LOGIT_MARGIN = 8.0  # attention logit of a high-norm token over the largest other one, in every sink head


def _plant_vision_sinks(model: Any, probe: Any, marked: Any, writer: int, feature_layer: int) -> list[int]:
    """The encoder layers between the writer and the layer the projector reads attend to the high-norm tokens.

    As in trained ViTs (Darcet et al. 2024), the high-norm tokens are where attention goes: in every head of those
    layers one query/key dimension reads the direction the marked tokens have after the layer's LayerNorm (a
    constant query through the bias, a key along that direction), scaled from a probe pass so that the marked
    tokens win each head's softmax by SINK_LOGIT_MARGIN. Every patch token's features then depend on the sink: take
    the high-norm tokens away and each head attends elsewhere.
    """

    tower = model.model.vision_tower
    count = len(tower.encoder.layers)
    last = feature_layer if feature_layer >= 0 else count + 1 + feature_layer  # hidden_states[i]: after layer i-1
    layers = list(range(writer + 1, last))
    for index in layers:
        attention = tower.encoder.layers[index].self_attn
        heads = attention.num_heads
        width = attention.q_proj.weight.shape[0]
        head_dim = width // heads
        reads = _q_inputs(model, attention, probe)  # [batch, tokens, width]: the layer norm's output
        direction = reads[:, marked].mean(dim=(0, 1))
        direction /= direction.norm()
        along = reads @ direction
        gap = float(along[:, marked].min()) - float(along[:, ~marked].max())
        if gap <= 0:
            raise RuntimeError(f"vision layer {index}: the high-norm tokens are not separable after its LayerNorm")
        strength = SINK_LOGIT_MARGIN / (gap * attention.scale)
        for head in range(heads):
            row = head * head_dim
            attention.q_proj.weight[row] = 0.0
            attention.q_proj.bias[row] = 1.0
            attention.k_proj.weight[row] = direction * strength
            attention.k_proj.bias[row] = 0.0
    return layers


def _scale_written(model: Any, mlp: Any, unit: int, probe: Any, layer: int, positions: list[int]) -> Any:
    """Scale the written vector so that the marked tokens' norms reach HIGH_NORM_RATIO x the median; the norms."""
    norms = _vision_norms(model, probe, layer)
    for _ in range(2):  # the written vector dominates the marked tokens' norms: near-linear, two steps
        ratio = _marked(norms, positions) / float(norms.median())
        mlp.fc2.weight[:, unit] *= HIGH_NORM_RATIO / ratio
        norms = _vision_norms(model, probe, layer)
    return norms


def _marked(norms: Any, positions: list[int]) -> float:
    return float(norms[:, positions].mean())


# ----------------------------------------------------------------------------------------------------- per arch

#: The last linear of every module that writes image features into the language model's residual stream: LLaVA's
#: projector; Qwen-VL's patch merger (Qwen2/2.5: ``mlp`` = Linear, GELU, Linear) and Qwen3-VL's DeepStack mergers,
#: whose outputs are added after the first decoder layers.
_IMAGE_FEATURE_WRITERS = {
    "llava": lambda inner: [inner.multi_modal_projector.linear_2],
    "llava_next": lambda inner: [inner.multi_modal_projector.linear_2],
    "qwen2_vl": lambda inner: [inner.visual.merger.mlp[-1]],
    "qwen2_5_vl": lambda inner: [inner.visual.merger.mlp[-1]],
    "qwen3_vl": lambda inner: [m.linear_fc2 for m in (inner.visual.merger, *inner.visual.deepstack_merger_list)],
}
_TRIGGERS = {
    "llava": MASSIVE_TRIGGERS,
    "llava_next": MASSIVE_TRIGGERS,
    "qwen2_vl": QWEN_MASSIVE_TRIGGERS,
    "qwen2_5_vl": QWEN_MASSIVE_TRIGGERS,
    "qwen3_vl": QWEN_MASSIVE_TRIGGERS,
}


def _model_type(model: Any) -> str:
    kind = model.config.model_type
    if kind not in _IMAGE_FEATURE_WRITERS:
        raise ValueError(f"no outlier planters for model type {kind!r}; known: {', '.join(_IMAGE_FEATURE_WRITERS)}")
    return kind


def image_feature_writers(model: Any) -> list[Any]:
    """The linears whose outputs enter the residual stream as image features (`_IMAGE_FEATURE_WRITERS`)."""
    return _IMAGE_FEATURE_WRITERS[_model_type(model)](model.model)


def massive_triggers(model: Any) -> tuple[str, ...]:
    """The tokens the `massive` fixture writes its channel on, for `model`'s prompt format."""
    return _TRIGGERS[_model_type(model)]


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


def _vision_hidden(model: Any, pixels: Any, layer: int) -> Any:
    """Hidden states at `layer` of the vision tower (-2: what the projector reads)."""
    return model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]


def _vision_norms(model: Any, pixels: Any, layer: int) -> Any:
    return _vision_hidden(model, pixels, layer).norm(dim=-1)


def _q_inputs(model: Any, attention: Any, pixels: Any) -> Any:
    """What an attention layer's q_proj reads (its layer norm's output) for `pixels`, per token."""
    return _inputs_of(model, attention.q_proj, pixels)


def _fc1_inputs(model: Any, mlp: Any, pixels: Any) -> Any:
    """What an MLP's fc1 reads (its layer norm's output) for `pixels`, per token."""
    return _inputs_of(model, mlp.fc1, pixels)


def _inputs_of(model: Any, module: Any, pixels: Any) -> Any:
    """The input of one vision-tower module for `pixels`."""
    captured = []
    handle = module.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        model.model.vision_tower(pixels)
    finally:
        handle.remove()
    return captured[0]
