"""Kimi-VL multi-modal projector (``multi_modal_projector.*``); ``encode_images`` (defined in ``vision``) re-exported.

Official keys (spec §3.2): ``pre_norm.{weight,bias}`` (C), ``linear_1.{weight,bias}`` (C*kh*kw -> C*kh*kw),
``linear_2.{weight,bias}`` (C*kh*kw -> text hidden_size).

Math, as in the official ``KimiVLMultiModalProjector`` (verbatim in vLLM ``vllm/model_executor/models/kimi_vl.py``
and in a public PyTorch copy of the official ``modeling_kimi_vl.py``; same in mlx-vlm
``mlx_vlm/models/kimi_vl/kimi_vl.py``)::

    h = pre_norm(features)            # features (M, kh*kw, C): LayerNorm(C, eps 1e-5) on EACH sub-token
    h = h.view(-1, C*kh*kw)           # then concatenate the kh*kw sub-tokens (merger order)
    h = linear_2(gelu(linear_1(h)))   # GELUActivation = exact erf GELU

``pre_norm`` is built with ``LayerNorm(vision_config.hidden_size)``, so it normalises each 1152-wide sub-token
before the ``view`` concatenates them; it is not a norm over the 4608-wide vector. SGLang's port replaces the
activation by QuickGELU, which deviates from the official code (spec §6.6); we use exact GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KimiVLConfig
from engine.model.vision import encode_images  # re-exported: also importable from here

__all__ = ["KimiVLMultiModalProjector", "encode_images", "PROJECTOR_LN_EPS"]

PROJECTOR_LN_EPS = 1e-5  # hard-coded in the official projector


class KimiVLMultiModalProjector(nn.Module):
    def __init__(self, cfg: KimiVLConfig) -> None:
        super().__init__()
        vc = cfg.vision_config
        self.vision_hidden = vc.hidden_size
        self.hidden_size = cfg.projector_input_size
        self.pre_norm = nn.LayerNorm(vc.hidden_size, eps=PROJECTOR_LN_EPS)
        self.linear_1 = nn.Linear(self.hidden_size, self.hidden_size, bias=True)
        self.linear_2 = nn.Linear(self.hidden_size, cfg.text_config.hidden_size, bias=True)

    def forward(self, image_features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """(M, kh*kw, C) merged features (or a list of them, concatenated in order) -> (M, text hidden)."""
        if isinstance(image_features, (list, tuple)):
            image_features = torch.cat(list(image_features), dim=0)
        f = image_features
        if f.dim() != 3 or f.shape[-1] != self.vision_hidden or f.shape[1] * f.shape[2] != self.hidden_size:
            raise ValueError(
                f"expected merged features (M, {self.hidden_size // self.vision_hidden}, {self.vision_hidden}); "
                f"got {tuple(image_features.shape)}"
            )
        x = image_features.to(self.linear_1.weight.dtype)
        h = self.pre_norm(x).reshape(-1, self.hidden_size)
        h = F.gelu(self.linear_1(h))  # exact erf form
        return self.linear_2(h)
