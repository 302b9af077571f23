"""Paged cache blocks with hash-based prefix caching.

A block holds ``block_size`` consecutive tokens' MLA latents. A full block's identity is a hash chained over
every earlier block, its own token ids, and — because all placeholder tokens of all images share one id —
the content hash of each image whose placeholders fall inside it (with the offset into that image). Hashes are
published only once the block's latents have actually been computed, so no request can read a block that is
still being filled. Freed blocks keep their hash and stay reusable until the allocator hands them out again
(oldest freed first, i.e. LRU).

Every sequence holding blocks also owns a row of :class:`BlockTables`, one numpy array mirroring the block tables
(a block appended is one write), so a decode step's key slots for all rows are one fancy-indexing copy, not a
Python loop over rows and blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import numpy as np

from engine.runtime.sequence import ImageSpan, Sequence


class NoFreeBlocksError(RuntimeError):
    pass


def block_extra_keys(images: list[ImageSpan], start: int, end: int) -> bytes:
    """Image identities for positions [start, end): content hash and the offset where the block enters it."""
    parts = []
    for image in images:
        if image.start < end and image.end > start:
            parts.append(image.content_hash + max(start - image.start, 0).to_bytes(4, "little"))
    return b"".join(parts)


def chain_hash(previous: bytes, token_bytes: bytes | memoryview, extra: bytes) -> bytes:
    """A block's key: the previous block's, its token ids as ``token_bytes`` (4 bytes per id, native order:
    hashes never leave the process) and its image keys."""
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update((len(token_bytes) // 4).to_bytes(4, "little"))
    digest.update(token_bytes)
    digest.update(extra)
    return digest.digest()


class BlockTables:
    """All block tables as rows of one int64 array (grown by doubling). Row ``seq.table_row`` holds the sequence's
    blocks in its first ``len(seq.block_table)`` columns; the rest are stale but valid block ids (never read
    unmasked)."""

    def __init__(self, rows: int = 64, columns: int = 64) -> None:
        self.array = np.zeros((rows, columns), dtype=np.int64)
        self._free = list(range(rows - 1, -1, -1))

    def acquire(self) -> int:
        if not self._free:
            rows = self.array.shape[0]
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        return self._free.pop()

    def release(self, row: int) -> None:
        self._free.append(row)

    def ensure_columns(self, columns: int) -> None:
        width = self.array.shape[1]
        if columns > width:
            while width < columns:
                width *= 2
            grown = np.zeros((self.array.shape[0], width), dtype=np.int64)
            grown[:, : self.array.shape[1]] = self.array
            self.array = grown

    def write(self, row: int, start: int, blocks: list[int]) -> None:
        self.ensure_columns(start + len(blocks))
        self.array[row, start : start + len(blocks)] = blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Free blocks in LRU order (oldest freed first). Both never-used and cached-but-free blocks live here.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hits = 0
        self.queries = 0
        self.tables = BlockTables()

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold ``num_tokens`` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    # ------------------------------------------------------------------ prefix cache
    def _prompt_block_hashes(self, seq: Sequence, upto_tokens: int) -> list[bytes]:
        """The hash chain of the sequence's first ``upto_tokens // block_size`` blocks. The chain is kept on the
        sequence (a full block's tokens never change), so admission and publishing hash each block once."""
        bs = self.block_size
        count = upto_tokens // bs
        hashes = seq.block_hashes
        first = len(hashes)
        if first < count:  # the new blocks' ids converted once, then hashed slice by slice
            tokens = memoryview(array("I", seq.tokens_between(first * bs, count * bs)).tobytes())
            for b in range(first, count):
                start = b * bs
                previous = hashes[-1] if hashes else b""
                extra = block_extra_keys(seq.images, start, start + bs) if seq.images else b""
                hashes.append(chain_hash(previous, tokens[(start - first * bs) * 4:(start - first * bs + bs) * 4], extra))
        return hashes[:count]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold the leading tokens of ``seq`` (never all of them: one token is recomputed)."""
        cacheable = (len(seq) - 1) // self.block_size
        hashes = self._prompt_block_hashes(seq, cacheable * self.block_size)
        found = []
        for h in hashes:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            found.append(block)
        self.queries += cacheable
        self.hits += len(found)
        return found

    def admit(self, seq: Sequence) -> None:
        """Attach the cached prefix blocks of a sequence that holds no blocks yet."""
        assert not seq.block_table
        cached = self.match_prefix(seq)
        for block in cached:
            self._take(block)
        seq.block_table = list(cached)
        seq.table_row = self.tables.acquire()
        self.tables.write(seq.table_row, 0, cached)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size
        seq.num_registered_blocks = len(cached)

    def publish(self, seq: Sequence) -> None:
        """Publish hashes of blocks that became full and computed, so later requests can reuse them (never past a
        token still being sampled on the device: its id is not known yet)."""
        if seq.num_computed_tokens // self.block_size <= seq.num_registered_blocks:
            return
        full = min(seq.num_computed_tokens, len(seq) - seq.num_pending) // self.block_size
        if full <= seq.num_registered_blocks:
            return
        hashes = self._prompt_block_hashes(seq, full * self.block_size)
        for b in range(seq.num_registered_blocks, full):
            h, block = hashes[b], seq.block_table[b]
            owner = self.hash_to_block.get(h)
            if owner is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
        seq.num_registered_blocks = full

    # ------------------------------------------------------------------ allocation
    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _allocate_fresh(self) -> int:
        if not self.free:
            raise NoFreeBlocksError("no free cache blocks")
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:  # evict: this block's old content is about to be overwritten
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make ``seq`` hold at least ``num_tokens`` tokens; raises NoFreeBlocksError without partial change."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free):
            raise NoFreeBlocksError(f"need {needed} blocks, {len(self.free)} free")
        if not needed:
            return
        if seq.table_row < 0:
            seq.table_row = self.tables.acquire()
        start = len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._allocate_fresh())
        self.tables.write(seq.table_row, start, seq.block_table[start:])

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks at zero references return to the free list (hash kept)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        if seq.table_row >= 0:
            self.tables.release(seq.table_row)
            seq.table_row = -1
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
