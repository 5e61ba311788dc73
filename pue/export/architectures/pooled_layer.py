"""The language model's last layer, evaluated for the pooled token only.

An embedding reads one position of the last layer's output. Every earlier layer must run on the whole
sequence (the pooled token attends to all of it), but the last layer's query, attention, output projection,
MLP and final norm matter at that one position: its keys and values still come from every token. For the
`bench` preset this removes a tenth of the decoder's work, exactly (the parity gate compares the result with
the unmodified Hugging Face model).

Supported: Llama-style layers (`input_layernorm`, `self_attn.{q,k,v,o}_proj` with rotary embeddings,
`post_attention_layernorm`, `mlp`) without per-head q/k norms or a sliding window — Llama, Mistral, Qwen2,
Vicuna. Anything else keeps the full last layer (`pooled_last_layer_support` says why).

The single-row attention is written as broadcast products and sums, not MatMul → Softmax → MatMul, so target
fusions that expect a square attention (`pue.optimize.attention`) leave it alone.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

REQUIRED = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def pooled_last_layer_support(language_model: nn.Module) -> str | None:
    """None when the last layer can run for the pooled row only, else the reason it cannot."""
    layers = getattr(language_model, "layers", None)
    if layers is None or len(layers) < 2 or not hasattr(language_model, "norm"):
        return "the language model has no `layers` / `norm` to split"
    if not hasattr(language_model, "rotary_emb"):
        return "no rotary embedding module"
    layer = layers[-1]
    if not all(hasattr(layer, name) for name in REQUIRED):
        return f"{type(layer).__name__} is not a Llama-style layer"
    attention = layer.self_attn
    if not all(isinstance(getattr(attention, name, None), nn.Linear) for name in PROJECTIONS):
        return f"{type(attention).__name__} has no q/k/v/o projections"
    if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
        return f"{type(attention).__name__} normalises q/k per head"
    config = language_model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if _rotary_function(attention) is None:
        return f"{type(attention).__module__} has no apply_rotary_pos_emb"
    return None


def _rotary_function(attention: nn.Module) -> Any:
    return getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)


def trunk_of(language_model: nn.Module) -> nn.Module:
    """A view of the language model without its last layer and final norm (parameters shared, not copied)."""
    trunk = copy.copy(language_model)
    trunk._modules = dict(language_model._modules)
    trunk.layers = nn.ModuleList(list(language_model.layers)[:-1])
    trunk.norm = nn.Identity()
    return trunk


class PooledLastLayer(nn.Module):
    """hidden [B, S, H] (after the other layers) → the final normed hidden state of row b at pooled_index[b]."""

    def __init__(self, language_model: nn.Module) -> None:
        super().__init__()
        self.layer = language_model.layers[-1]
        self.norm = language_model.norm
        self.rotary_emb = language_model.rotary_emb
        attention = self.layer.self_attn
        self.head_dim = int(attention.head_dim)
        self.scaling = float(attention.scaling)
        self.heads = attention.q_proj.out_features // self.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self._rotary = _rotary_function(attention)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pooled_index: torch.Tensor,
    ) -> torch.Tensor:
        batch, seq, _ = hidden.shape
        rows = torch.arange(batch, device=hidden.device, dtype=torch.int64)
        attention = self.layer.self_attn
        normed = self.layer.input_layernorm(hidden)
        cos, sin = self.rotary_emb(hidden, position_ids=position_ids)

        keys = attention.k_proj(normed).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        values = attention.v_proj(normed).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        keys = self._rotary(keys, keys, cos, sin)[1]
        query_in = normed[rows, pooled_index].unsqueeze(1)  # [B, 1, H]
        query = attention.q_proj(query_in).view(batch, 1, self.heads, self.head_dim).transpose(1, 2)
        query = self._rotary(query, query, cos[rows, pooled_index].unsqueeze(1), sin[rows, pooled_index].unsqueeze(1))[
            0
        ]

        group = self.heads // self.kv_heads
        keys = (
            keys[:, :, None].expand(batch, self.kv_heads, group, seq, self.head_dim).reshape(batch, self.heads, seq, -1)
        )
        values = values[:, :, None].expand(batch, self.kv_heads, group, seq, self.head_dim)
        values = values.reshape(batch, self.heads, seq, self.head_dim)

        scores = (query * keys).sum(-1) * self.scaling  # [B, heads, S]
        positions = torch.arange(seq, device=hidden.device, dtype=torch.int64).unsqueeze(0)
        visible = (positions <= pooled_index.unsqueeze(1)) & (attention_mask > 0)  # causal row + padding
        scores = torch.where(visible.unsqueeze(1), scores, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.to(torch.float32), dim=-1).to(values.dtype)
        context = (probs.unsqueeze(-1) * values).sum(-2)  # [B, heads, head_dim]

        pooled = hidden[rows, pooled_index] + attention.o_proj(context.reshape(batch, self.heads * self.head_dim))
        pooled = pooled + self.layer.mlp(self.layer.post_attention_layernorm(pooled))
        return self.norm(pooled)
