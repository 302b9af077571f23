"""Projected image features by content hash, so an image sent again (next turn, next agent step) is not re-encoded.

Keys are ``engine.processor.ImageItem.key``: a hash of the image's encoded bytes (or decoded pixels) and the
processor settings, computed before any pixel work, so request preprocessing (on its own threads) can ``peek``
and skip decoding a known image altogether; the engine thread ``get``s and ``put``s. A lock keeps the LRU
consistent across those threads.
"""

from __future__ import annotations

import threading
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
        self._lock = threading.Lock()

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            value = self.entries.get(key)
            if value is not None:
                self.entries.move_to_end(key)
            return value

    def peek(self, key: bytes) -> torch.Tensor | None:
        """``get`` for request preprocessing (thread-safe; counts nothing: the engine counts hits when it runs)."""
        return self.get(key)

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if self.max_rows <= 0:
            return
        with self._lock:
            if key in self.entries:
                return
            self.entries[key] = value
            self.rows += value.shape[0]
            while self.rows > self.max_rows and len(self.entries) > 1:
                _, old = self.entries.popitem(last=False)
                self.rows -= old.shape[0]
