"""Kimi-VL: MoonViT -> 2x2 merge projector -> features scattered into ``<|media_pad|>`` positions -> decoder.

Top-level module names match the checkpoint prefixes: ``vision_tower``, ``multi_modal_projector``,
``language_model``.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import KimiVLConfig
from engine.model.decoder import DeepseekV3ForCausalLM, LatentCache
from engine.model.projector import KimiVLMultiModalProjector
from engine.model.vision import MoonVitPretrainedModel, encode_images


class PlaceholderMismatchError(ValueError):
    """The prompt's ``<|media_pad|>`` count differs from the number of image feature rows."""


class KimiVLForConditionalGeneration(nn.Module):
    def __init__(self, config: KimiVLConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = MoonVitPretrainedModel(config.vision_config)
        self.multi_modal_projector = KimiVLMultiModalProjector(config)
        self.language_model = DeepseekV3ForCausalLM(config.text_config)
        if config.text_config.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    def encode_images(self, pixel_values: torch.Tensor, image_grid_hws: torch.Tensor) -> torch.Tensor:
        """Packed patches of all images -> (total merged tokens, hidden) in image order."""
        return encode_images(self.vision_tower, self.multi_modal_projector, pixel_values, image_grid_hws)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hws: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written, in order, over the placeholder positions."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        is_pad = input_ids == self.config.media_placeholder_token_id
        n_pads = int(is_pad.sum())
        if image_features is None and pixel_values is not None:
            if image_grid_hws is None:
                raise ValueError("pixel_values given without image_grid_hws")
            image_features = self.encode_images(pixel_values, image_grid_hws)
        n_rows = 0 if image_features is None else image_features.shape[0]
        if n_pads != n_rows:
            raise PlaceholderMismatchError(
                f"prompt has {n_pads} <|media_pad|> tokens but the images give {n_rows} feature rows"
            )
        if n_rows:
            embeds = embeds.masked_scatter(is_pad[..., None], image_features.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hws: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, L) -> float32 logits (B, L, vocab).

        ``attention_mask`` (B, past+L), 1 for real tokens, supports left padding; positions then count real
        tokens only, as HF generation does. With ``cache`` the new tokens continue the cached sequence.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        embeds = self.embed(input_ids, pixel_values, image_grid_hws)
        if position_ids is None:
            position_ids = default_positions(input_ids, attention_mask, cache.length() if cache else 0)
        return self.language_model(embeds, position_ids, attention_mask, cache)


def default_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int) -> torch.Tensor:
    bsz, q_len = input_ids.shape
    if attention_mask is None:
        return torch.arange(past, past + q_len, device=input_ids.device).expand(bsz, q_len)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, past : past + q_len]
