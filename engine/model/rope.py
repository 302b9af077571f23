"""Interleaved ("GPT-J") rotary embedding applied to the 64 rope dims of MLA queries and the shared key.

Its own module so that the fused decode kernels' references (``engine.kernels.decode``) and the decoder modules
(which call those kernels as a backend) both import it without an import cycle.
"""

from __future__ import annotations

import torch


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (2j, 2j+1) of the last dim; cos/sin broadcast over (..., L, dim/2)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)
