"""CUDA graphs of the pure-decode step: capture per (batch, key-length) bucket and replay from the sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.kernels import use_triton
from engine.runtime.sequence import Sequence
from engine.runtime.step import StepMetadata

if TYPE_CHECKING:
    from engine.runtime.runner import ModelRunner


def pad_decode_metadata(meta: StepMetadata, batch: int, keys: int, scratch_slot: int) -> StepMetadata:
    """A pure-decode step padded to ``batch`` rows and ``keys`` key slots: extra rows write to and attend only
    the scratch slot, so they never touch real cache blocks and never produce NaNs."""
    n, length = meta.decode_slots.shape
    dev = meta.input_ids.device
    slots = torch.full((batch, keys), scratch_slot, dtype=torch.long, device=dev)
    slots[:n, :length] = meta.decode_slots
    mask = torch.zeros(batch, keys, dtype=torch.bool, device=dev)
    mask[:n, :length] = meta.decode_mask
    mask[n:, 0] = True
    ids = torch.zeros(batch, dtype=torch.long, device=dev)
    ids[:n] = meta.input_ids
    positions = torch.zeros(batch, dtype=torch.long, device=dev)
    positions[:n] = meta.positions
    slot_mapping = torch.full((batch,), scratch_slot, dtype=torch.long, device=dev)
    slot_mapping[:n] = meta.slot_mapping
    rows = torch.arange(batch, device=dev)
    return StepMetadata(
        input_ids=ids, positions=positions, slot_mapping=slot_mapping, decode_rows=rows, decode_slots=slots,
        decode_mask=mask, prefills=[], logit_rows=rows, image_rows=None, image_features=None,
    )


def write_decode_inputs(host: np.ndarray, seqs: list[Sequence], batch: int, keys: int, block_size: int,
                        scratch_slot: int) -> None:
    """Fill a graph's packed input layout (see :class:`CapturedDecode`) for one decode token per sequence.

    Only each row's own key slots are written; past a row's length the slots keep older values, which are valid
    slots and masked out. Padded rows write the scratch slot and attend one key."""
    slots = host[4 * batch :].reshape(batch, keys)
    offsets = np.arange(block_size, dtype=np.int64)
    for row, seq in enumerate(seqs):
        start = seq.num_computed_tokens
        table = np.asarray(seq.block_table[: start // block_size + 1], dtype=np.int64)
        host[row] = seq.tokens_between(start, start + 1)[0]
        host[batch + row] = start
        host[2 * batch + row] = table[start // block_size] * block_size + start % block_size
        host[3 * batch + row] = start + 1
        width = min(table.size * block_size, keys)
        slots[row, :width] = (table[:, None] * block_size + offsets).reshape(-1)[:width]
    n = len(seqs)
    host[2 * batch + n : 3 * batch] = scratch_slot
    host[3 * batch + n : 4 * batch] = 1


@dataclass
class CapturedDecode:
    """One captured decode graph and the buffers it reads.

    ``packed`` (device, int64) holds every per-step input: ids, positions, write slots and key counts (``batch``
    each), then the key slots (``batch`` x ``keys``). The graph itself derives the key mask and int32 lengths from
    it, so a step costs one host->device copy from ``staging`` (pinned, same layout) and one launch. ``packed`` and
    ``staging`` are allocated outside the capture's memory pool and live as long as the graph.
    """

    graph: torch.cuda.CUDAGraph
    static: StepMetadata
    output: torch.Tensor
    packed: torch.Tensor
    staging: torch.Tensor
    copied: torch.cuda.Event  # the last copy out of ``staging``; it must finish before ``staging`` is rewritten


class DecodeGraphs:
    """CUDA graphs of the whole decode step, one per (batch bucket, key-length bucket), captured on first use.

    Decode is launch-bound at small batch (hundreds of small kernels per step); replaying a graph removes the
    per-kernel CPU cost. Padded rows write only the scratch slot and attend one key, so they never touch real
    cache blocks and never produce NaNs.
    """

    BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
    MIN_KEYS = 256

    def __init__(self, runner: ModelRunner, max_keys: int | None = None) -> None:
        self.runner = runner
        self.max_keys = max_keys or runner.config.max_position_embeddings
        self.graphs: dict[tuple[int, int], CapturedDecode] = {}
        self.pool = None
        self.replays = 0
        self.from_sequences = True  # False: graph inputs go through prepare + pad (kept for comparison)
        self.share_pool = True  # one memory pool for every captured graph (False: a pool per graph)

    def reset(self) -> None:
        """Drop every captured graph (and their memory pool: a pool no graph uses any more can't be reused)."""
        self.graphs.clear()
        self.pool = None

    @staticmethod
    def _bucket(value: int, buckets) -> int | None:
        return next((b for b in buckets if b >= value), None)

    def key_bucket(self, keys: int) -> int:
        size = self.MIN_KEYS
        while size < keys:
            size *= 2
        return size

    def fused(self) -> bool:
        """Graphs replay only the fused decode path (key counts, no key mask). Graphs of the mask-based path
        read a corrupted key mask on the H100 in the engine benchmark (rows went NaN; bench/RESULTS.md), so
        without Triton, or with the fused path off, decode steps run eagerly."""
        return self.runner.decode_backend != "modules" and use_triton(self.runner.kv_cache)

    def applicable(self, meta: StepMetadata) -> bool:
        n = meta.decode_rows.numel()
        return (
            self.fused() and n > 0 and not meta.prefills and meta.image_rows is None and n == meta.input_ids.numel()
            and meta.logit_rows.numel() == n and n <= self.BATCH_BUCKETS[-1]
            and meta.decode_slots.shape[1] <= self.max_keys
        )

    # ------------------------------------------------------------------ capture
    @staticmethod
    def _views(packed: torch.Tensor, batch: int, keys: int, rows: torch.Tensor, key_index: torch.Tensor) -> StepMetadata:
        """The step's metadata as views of ``packed`` plus the mask and lengths derived from it (device ops, so
        inside a capture they become part of the graph)."""
        lengths = packed[3 * batch : 4 * batch]
        return StepMetadata(
            input_ids=packed[:batch], positions=packed[batch : 2 * batch], slot_mapping=packed[2 * batch : 3 * batch],
            decode_rows=rows, decode_slots=packed[4 * batch :].view(batch, keys),
            decode_mask=key_index[None, :] < lengths[:, None], prefills=[], logit_rows=rows, image_rows=None,
            image_features=None, decode_lengths=lengths.to(torch.int32),
        )

    def _capture(self, batch: int, keys: int) -> CapturedDecode:
        runner = self.runner
        dev = runner.device
        scratch = runner.scratch_slot
        staging = torch.zeros(4 * batch + batch * keys, dtype=torch.long).pin_memory()
        staging[2 * batch : 3 * batch] = scratch
        staging[3 * batch : 4 * batch] = 1
        staging[4 * batch :] = scratch
        packed = staging.to(dev)
        rows = torch.arange(batch, device=dev)
        key_index = torch.arange(keys, device=dev)
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and autotuning outside the capture
                runner.forward_eager(self._views(packed, batch, keys, rows, key_index))
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None or not self.share_pool:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static = self._views(packed, batch, keys, rows, key_index)
            output = runner.forward_eager(static)
        copied = torch.cuda.Event()
        copied.record()
        return CapturedDecode(graph, static, output, packed, staging, copied)

    def _entry(self, rows: int, max_keys: int) -> CapturedDecode:
        key = (self._bucket(rows, self.BATCH_BUCKETS), self.key_bucket(max_keys))
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        return self.graphs[key]

    def _replay(self, cap: CapturedDecode, n: int) -> torch.Tensor:
        cap.graph.replay()
        self.replays += 1
        return cap.output[:n]

    # ------------------------------------------------------------------ replay
    def run_sequences(self, seqs: list[Sequence], num_new_tokens: list[int]) -> torch.Tensor | None:
        """Logits of a pure-decode step straight from the sequences (no ``prepare``): the inputs are written into
        the graph's pinned staging buffer on the host and sent in one copy. None when no graph covers the step
        (a prefill row, an image token, too many rows or keys); the caller then takes the general path."""
        n = len(seqs)
        if n == 0 or n > self.BATCH_BUCKETS[-1] or not self.fused():
            return None
        longest = 0
        for seq, k in zip(seqs, num_new_tokens):
            start = seq.num_computed_tokens
            if k != 1 or start == 0 or start + 1 != len(seq):
                return None
            if any(image.start <= start < image.end for image in seq.images):
                return None
            longest = max(longest, start + 1)
        if longest > self.max_keys:
            return None
        cap = self._entry(n, longest)
        batch, keys = cap.static.decode_slots.shape
        cap.copied.synchronize()  # the previous step's copy out of this staging buffer has finished
        write_decode_inputs(cap.staging.numpy(), seqs, batch, keys, self.runner.block_size, self.runner.scratch_slot)
        cap.packed.copy_(cap.staging, non_blocking=True)
        cap.copied.record()
        return self._replay(cap, n)

    def run(self, meta: StepMetadata) -> torch.Tensor:
        """Replay for metadata already on the device (``prepare``'s output)."""
        n = meta.decode_rows.numel()
        cap = self._entry(n, meta.decode_slots.shape[1])
        batch, keys = cap.static.decode_slots.shape
        padded = pad_decode_metadata(meta, batch, keys, self.runner.scratch_slot)
        lengths = padded.decode_mask.sum(dim=1)
        packed = cap.packed
        for i, part in enumerate((padded.input_ids, padded.positions, padded.slot_mapping, lengths)):
            packed[i * batch : (i + 1) * batch].copy_(part)
        packed[4 * batch :].view(batch, keys).copy_(padded.decode_slots)
        return self._replay(cap, n)
