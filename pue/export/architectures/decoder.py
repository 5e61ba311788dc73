"""The decoder graph shared by LLaVA-style models: token lookup, per-row image placement, LM, pooling, L2 norm."""

from __future__ import annotations

import torch
from torch import nn

from pue.export.architectures.pooled_layer import PooledLastLayer, pooled_last_layer_support, trunk_of


class EmbeddingDecoder(nn.Module):
    """input_ids, attention_mask, image_features -> unit `sentence_embedding`.

    Row b's k-th image-token position takes image_features[b, k] (a gather on the running count of image
    tokens), never HF's batch-wide `masked_scatter`. Position ids come from the mask, so left and right
    padding give the same result; pooling takes the last real token (or the token before `<emb>`).

    Where the language model allows it, its last layer runs for the pooled token only (`pooled_layer`);
    `last_layer` says which way the graph was built.
    """

    def __init__(
        self,
        language_model: nn.Module,
        embed_tokens: nn.Module,
        image_token_id: int,
        pool_token_id: int | None,
        pooled_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = int(image_token_id)
        self.pool_token_id = None if pool_token_id is None else int(pool_token_id)
        why_not = pooled_last_layer_support(language_model) if pooled_last_layer else "disabled"
        if why_not is None:
            self.language_model = trunk_of(language_model)
            self.last_layer: nn.Module | None = PooledLastLayer(language_model)
            self.last_layer_mode = "pooled token only"
        else:
            self.language_model = language_model
            self.last_layer = None
            self.last_layer_mode = f"full sequence ({why_not})"

    def positions(self, mask: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """Position ids [batch, seq] counted over real tokens (architectures with other positions override it)."""
        return torch.clamp(torch.cumsum(mask, dim=1) - 1, min=0)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        return self.embed(input_ids, attention_mask, image_features)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: torch.Tensor,
        deepstack_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The graph's body; `deepstack_features` [batch, image_tokens, levels, hidden] (Qwen3-VL) are placed by the
        same per-row gather as `image_features` and handed to the language model, zero at every other position."""
        batch, seq = input_ids.shape
        is_image = input_ids == self.image_token_id
        text_ids = torch.where(is_image, torch.zeros_like(input_ids), input_ids)
        embeds = self.embed_tokens(text_ids)

        slots_per_row = image_features.shape[1]
        # k-th image token of a row -> slot k; every other position reads slot 0 and is discarded below
        slot = (torch.cumsum(is_image.to(torch.int64), dim=1) - 1) * is_image.to(torch.int64)
        row_offset = torch.arange(batch, device=input_ids.device, dtype=torch.int64).unsqueeze(1) * slots_per_row
        gather = slot + row_offset
        flat_features = image_features.reshape(batch * slots_per_row, image_features.shape[-1]).to(embeds.dtype)
        embeds = torch.where(is_image.unsqueeze(-1), flat_features[gather], embeds)
        extra = {}
        if deepstack_features is not None:
            levels = deepstack_features.shape[2]
            flat = deepstack_features.reshape(batch * slots_per_row, levels, deepstack_features.shape[-1])
            placed = flat.to(embeds.dtype)[gather] * is_image.to(embeds.dtype)[:, :, None, None]
            extra = {"visual_pos_masks": is_image, "deepstack_visual_embeds": list(placed.unbind(dim=2))}

        mask = attention_mask.to(torch.int64)
        position_ids = self.positions(mask, is_image)
        hidden = self.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
            return_dict=True,
            **extra,
        ).last_hidden_state

        positions = torch.arange(seq, device=input_ids.device, dtype=torch.int64).unsqueeze(0)
        if self.pool_token_id is None:
            pooled_index = torch.amax(positions * mask, dim=1)
        else:
            pooled_index = torch.amax(positions * (input_ids == self.pool_token_id).to(torch.int64), dim=1) - 1
        if self.last_layer is not None:
            pooled = self.last_layer(hidden, position_ids, mask, pooled_index)
        else:
            flat_hidden = hidden.reshape(batch * seq, hidden.shape[-1])
            pooled = flat_hidden[pooled_index + torch.arange(batch, device=input_ids.device, dtype=torch.int64) * seq]
        pooled = pooled.to(torch.float32)
        return pooled / torch.clamp(torch.linalg.vector_norm(pooled, dim=-1, keepdim=True), min=1e-12)
