"""CUDA graphs of the pure-decode step: capture per (batch, key-length) bucket and replay from the sequences.

A replay's host side is a few numpy slices and one host->device copy: every per-step input (ids, positions, where
each id comes from, the rows' block tables) goes in one packed int64 buffer, and the graph itself derives the write
slots, the key slots, the key counts and the ids carried over from the previous step's samples (device-side, so
the engine can launch step N+1 before it has read step N's tokens; see ``engine.runtime.engine``).

Only this path exists: the older "prepared inputs" path (``prepare`` + ``pad_decode_metadata`` + copies into the
graph's buffers, kept for comparison) is gone, and with it the graphs of the mask-based decode attention whose key
mask read corrupted on the H100 (bench/RESULTS.md): graphs replay only the fused decode path, which reads key
counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.kernels import use_triton
from engine.runtime.sequence import Sequence
from engine.runtime.step import StepMetadata

if TYPE_CHECKING:
    from engine.runtime.block_manager import BlockTables
    from engine.runtime.runner import ModelRunner


def key_blocks(keys: int, block_size: int) -> int:
    return -(-keys // block_size)


def packed_size(batch: int, keys: int, block_size: int) -> int:
    """int64 entries of a graph's packed inputs: ids, positions, carry rows (``batch`` each), then the block
    tables (``batch`` x ``key_blocks``)."""
    return 3 * batch + batch * key_blocks(keys, block_size)


def write_decode_inputs(host: np.ndarray, seqs: list[Sequence], batch: int, keys: int, block_size: int,
                        scratch_block: int, tables: BlockTables | None = None,
                        carry_rows: np.ndarray | None = None) -> None:
    """Fill a graph's packed input layout (see :func:`packed_size`) for one decode token per sequence.

    ``tables``: the block manager's mirrored block tables (one fancy-indexing copy for all rows; without it each
    row's list is converted). ``carry_rows[r]``: the row of the previous step's samples that holds row ``r``'s input
    id (the host does not know it yet); None: ids come from the sequences. Padded rows sit at position 0 of the
    scratch block. Past a row's length its block ids are stale but valid, and masked out by its key count."""
    n = len(seqs)
    kb = key_blocks(keys, block_size)
    table = host[3 * batch :].reshape(batch, kb)
    host[batch : batch + n] = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=n)
    host[batch + n : 2 * batch] = 0
    if carry_rows is None:
        host[:n] = np.fromiter((s.last_token for s in seqs), dtype=np.int64, count=n)
        host[2 * batch : 3 * batch] = -1
    else:
        host[2 * batch : 2 * batch + n] = carry_rows
        host[2 * batch + n : 3 * batch] = -1
    host[n:batch] = 0
    if tables is not None:
        tables.ensure_columns(kb)
        rows = np.fromiter((s.table_row for s in seqs), dtype=np.int64, count=n)
        table[:n] = tables.array[rows, :kb]
    else:
        for row, seq in enumerate(seqs):
            blocks = seq.block_table[:kb]
            table[row, : len(blocks)] = blocks
    table[n:, 0] = scratch_block


def write_padded_inputs(host: np.ndarray, batch: int, scratch_block: int) -> None:
    """Every row of a packed input layout a padded row: id 0 from the host, position 0 of the scratch block."""
    host[: 2 * batch] = 0
    host[2 * batch : 3 * batch] = -1
    host[3 * batch :] = scratch_block


@dataclass
class CapturedDecode:
    """One captured decode graph and the buffers it reads.

    ``packed`` (device, int64; layout: :func:`packed_size`) holds every per-step input. ``staging`` is a pair of
    pinned host buffers of the same layout, used in turn, each with an event marking the end of its last copy into
    ``packed`` (it must finish before that buffer is rewritten). ``packed`` and ``staging`` are allocated outside
    the capture's memory pool and live as long as the graph.
    """

    graph: torch.cuda.CUDAGraph
    static: StepMetadata
    output: torch.Tensor
    packed: torch.Tensor
    staging: tuple[torch.Tensor, torch.Tensor]
    copied: tuple[torch.cuda.Event, torch.cuda.Event]
    turn: int = 0

    def park(self, scratch_block: int, ids: np.ndarray | None = None, position: int = 0) -> None:
        """Point every row's cache reads and writes at the scratch block, for benchmarks that replay the graph
        alone (no live cache block is written, no carry row is read). ``ids`` and ``position`` make the replay
        do a real step's work: distinct ids spread the MoE over its experts (all-equal ids would read six
        experts' weights), and ``position`` sets every row's key count (keys are read from the scratch block,
        so attention's cache traffic is understated)."""
        self.copied[self.turn].synchronize()  # this staging buffer's last copy has finished
        host = self.staging[self.turn].numpy()
        write_padded_inputs(host, self.batch, scratch_block)
        if ids is not None:
            host[: self.batch] = ids[: self.batch]
        host[self.batch : 2 * self.batch] = min(position, self.keys - 1)
        self.packed.copy_(self.staging[self.turn])

    @property
    def batch(self) -> int:
        return self.static.input_ids.shape[0]

    @property
    def keys(self) -> int:
        return self.static.decode_slots.shape[1]


def decode_views(packed: torch.Tensor, batch: int, keys: int, block_size: int, carry: torch.Tensor) -> StepMetadata:
    """The step's metadata derived from ``packed`` with device ops (inside a capture they become part of the
    graph): ids (from ``carry`` where a carry row is given), write slots, key slots and key counts."""
    kb = key_blocks(keys, block_size)
    dev = packed.device
    ids, positions, carry_rows = packed[:batch], packed[batch : 2 * batch], packed[2 * batch : 3 * batch]
    table = packed[3 * batch :].view(batch, kb)
    input_ids = torch.where(carry_rows >= 0, carry.index_select(0, carry_rows.clamp(min=0)), ids)
    slot_mapping = table.gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
    slots = (table[:, :, None] * block_size + torch.arange(block_size, device=dev)).view(batch, kb * block_size)
    if kb * block_size != keys:
        slots = slots[:, :keys].contiguous()
    lengths = positions + 1
    rows = torch.arange(batch, device=dev)
    return StepMetadata(
        input_ids=input_ids, positions=positions, slot_mapping=slot_mapping, decode_rows=rows, decode_slots=slots,
        decode_mask=torch.arange(keys, device=dev)[None, :] < lengths[:, None], prefills=[], logit_rows=rows,
        image_rows=None, image_features=None, decode_lengths=lengths.to(torch.int32),
    )


class DecodeGraphs:
    """CUDA graphs of the whole decode step, one per (batch bucket, key-length bucket), captured on first use,
    all in one memory pool.

    Decode is launch-bound at small batch (hundreds of small kernels per step); replaying a graph removes the
    per-kernel CPU cost. Padded rows write only the scratch block and attend one key, so they never touch real
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
        # the previous step's sampled ids, copied here by ``run_sequences(carry=...)``; every graph reads it
        self.carry = torch.zeros(self.BATCH_BUCKETS[-1], dtype=torch.long, device=runner.device)

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

    # ------------------------------------------------------------------ warm-up
    # past 4,096 key slots no decode kernel's compile-time constants change (attention splits are capped at 128
    # programs a step, reached at 32 keys a split), so smaller key buckets are all a warm-up needs
    WARM_UP_MAX_KEYS = 4096

    def warm_up(self, max_batch: int) -> int:
        """Run the decode step of every batch bucket up to ``max_batch``'s and every key bucket up to
        WARM_UP_MAX_KEYS once, eagerly, on padded rows (they write only the scratch block): Triton compiles and
        autotunes each kernel variant those steps need now, not inside the first request step at a new batch
        size (a bucket's first round ran at about twice its steady step time: bench/RESULTS.md, "Fifth H100
        run"). Graphs are still captured on first use. Returns the steps run (0 when graphs are off)."""
        if not self.fused():
            return 0
        runner, bs = self.runner, self.runner.block_size
        last = self._bucket(min(max_batch, self.BATCH_BUCKETS[-1]), self.BATCH_BUCKETS)
        batches = [b for b in self.BATCH_BUCKETS if b <= last]
        keys = [k for k in (self.MIN_KEYS * 2**i for i in range(16))
                if k <= min(self.WARM_UP_MAX_KEYS, self.key_bucket(self.max_keys))]
        for batch in batches:
            for width in keys:
                host = np.zeros(packed_size(batch, width, bs), dtype=np.int64)
                write_padded_inputs(host, batch, runner.scratch_slot // bs)
                runner.forward_eager(decode_views(torch.from_numpy(host).to(runner.device), batch, width, bs,
                                                  self.carry))
        return len(batches) * len(keys)

    # ------------------------------------------------------------------ capture
    def _capture(self, batch: int, keys: int) -> CapturedDecode:
        runner = self.runner
        dev = runner.device
        bs = runner.block_size
        size = packed_size(batch, keys, bs)
        staging = tuple(torch.zeros(size, dtype=torch.long).pin_memory() for _ in range(2))
        for buffer in staging:
            write_padded_inputs(buffer.numpy(), batch, runner.scratch_slot // bs)
        packed = staging[0].to(dev)
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and autotuning outside the capture
                runner.forward_eager(decode_views(packed, batch, keys, bs, self.carry))
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static = decode_views(packed, batch, keys, bs, self.carry)
            output = runner.forward_eager(static)
        events = (torch.cuda.Event(), torch.cuda.Event())
        for event in events:
            event.record()
        return CapturedDecode(graph, static, output, packed, staging, events)

    def _entry(self, rows: int, max_keys: int) -> CapturedDecode:
        key = (self._bucket(rows, self.BATCH_BUCKETS), self.key_bucket(max_keys))
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        return self.graphs[key]

    # ------------------------------------------------------------------ replay
    def covers(self, seqs: list[Sequence], num_new_tokens: list[int]) -> int:
        """The longest key count of the step if a graph can run it (one new token per sequence, the last one, not
        an image placeholder, within the buckets), else 0."""
        n = len(seqs)
        if n == 0 or n > self.BATCH_BUCKETS[-1] or not self.fused() or any(k != 1 for k in num_new_tokens):
            return 0
        longest = 0
        for seq in seqs:
            start = seq.num_computed_tokens
            if start == 0 or start + 1 != len(seq):
                return 0
            if seq.images and start < len(seq.prompt_ids) and any(im.start <= start < im.end for im in seq.images):
                return 0
            if start >= longest:
                longest = start + 1
        return longest if longest <= self.max_keys else 0

    def run_sequences(self, seqs: list[Sequence], num_new_tokens: list[int], tables: BlockTables | None = None,
                      carry: tuple[torch.Tensor, np.ndarray] | None = None) -> torch.Tensor | None:
        """Logits of a pure-decode step straight from the sequences (no ``prepare``): the inputs are written into
        the graph's pinned staging buffer on the host and sent in one copy. ``carry``: (the previous step's sampled
        ids on the device, the row of them each sequence continues from). None when no graph covers the step (a
        prefill row, an image token, too many rows or keys); the caller then takes the general path."""
        longest = self.covers(seqs, num_new_tokens)
        if not longest or (carry is not None and carry[0].numel() > self.carry.numel()):
            return None  # (a previous step of more rows than the largest bucket: the eager path gathers its ids)
        cap = self._entry(len(seqs), longest)
        batch, keys = cap.batch, cap.keys
        turn = cap.turn
        cap.turn ^= 1
        staging = cap.staging[turn]
        cap.copied[turn].synchronize()  # this buffer's previous copy has finished
        carry_rows = None
        if carry is not None:
            tokens, carry_rows = carry
            self.carry[: tokens.numel()].copy_(tokens, non_blocking=True)
        write_decode_inputs(staging.numpy(), seqs, batch, keys, self.runner.block_size,
                            self.runner.scratch_slot // self.runner.block_size, tables, carry_rows)
        cap.packed.copy_(staging, non_blocking=True)
        cap.copied[turn].record()
        cap.graph.replay()
        self.replays += 1
        return cap.output[: len(seqs)]
