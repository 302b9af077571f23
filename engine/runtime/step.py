"""Per-step inputs of the model runner: the flat token batch and the cache addressing each attention path needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillChunk:
    q_start: int  # first row of this chunk in the step's flat token batch
    q_len: int
    ctx_len: int  # keys the chunk attends to (cached prefix + the chunk itself)
    slots: torch.Tensor  # (ctx_len,) cache slots of those keys


@dataclass
class StepMetadata:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    slot_mapping: torch.Tensor  # (T,) where each new token's latent is written
    decode_rows: torch.Tensor  # (Sd,) rows of one-token sequences
    decode_slots: torch.Tensor  # (Sd, Lmax) cache slots each decode row attends to (padded)
    decode_mask: torch.Tensor  # (Sd, Lmax) bool, True = real key
    prefills: list[PrefillChunk]
    logit_rows: torch.Tensor  # (R,) rows whose next token is sampled
    image_rows: torch.Tensor | None  # (P,) rows that are image placeholders
    image_features: torch.Tensor | None  # (P, hidden) their features
    decode_lengths: torch.Tensor | None = None  # (Sd,) int32 keys per decode row (decode_mask is a prefix mask)
    # (None where absent: the fused path then sums decode_mask)
