"""Projected image features by content hash, so an image sent again (next turn, next agent step) is not re-encoded."""

from __future__ import annotations

from collections import OrderedDict

import torch


class VisionCache:
    """Projected image features by content hash (LRU, bounded in rows), so resent images aren't re-encoded."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.rows = 0
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if key in self.entries:
            return
        self.entries[key] = value
        self.rows += value.shape[0]
        while self.rows > self.max_rows and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.rows -= old.shape[0]
