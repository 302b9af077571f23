"""Continuous batching: every step picks which sequences run and how many of their tokens to compute.

One rule covers prefill and decode: a running sequence has ``len(seq) - num_computed_tokens`` tokens whose
latents are not cached yet; a step computes a chunk of them, and when the chunk reaches the end of the
sequence the step also samples its next token. Decodes (1 token each) are scheduled first so long prompts
never stall them; prompts then fill the remaining token budget in chunks (chunked prefill). When the cache
runs out, the most recently admitted sequence is preempted by recompute: its blocks are freed and it goes
back to the front of the queue, keeping the tokens it already generated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from engine.runtime.block_manager import BlockManager, NoFreeBlocksError
from engine.runtime.sequence import Sequence, SequenceStatus


class SchedulerConfig(BaseModel):
    max_num_seqs: int = Field(64, ge=1, description="sequences in the running batch")
    max_num_batched_tokens: int = Field(8192, ge=1, description="tokens computed per step (decode + prefill)")
    max_waiting: int = Field(1024, ge=0, description="queued requests before new ones are refused")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled or failed) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, victim: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.blocks.release(victim)
        victim.status = SequenceStatus.WAITING
        victim.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens

        # 1) running sequences, oldest first; decodes before chunks of unfinished prompts
        ordered = sorted(self.running, key=lambda s: (s.num_uncomputed > 1, s.arrival))
        for seq in ordered:
            if budget == 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            while True:
                try:
                    self.blocks.grow(seq, seq.num_computed_tokens + n)
                    break
                except NoFreeBlocksError:
                    victim = max(
                        (s for s in self.running if s is not seq and s not in batch.seqs),
                        key=lambda s: s.arrival,
                        default=None,
                    )
                    if victim is None:
                        break
                    self._preempt(victim, batch)
            if self.blocks.blocks_needed(seq, seq.num_computed_tokens + n):
                # even alone it does not fit now: preempt it too (it will come back when blocks free up)
                self._preempt(seq, batch)
                continue
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

        # 2) admit waiting sequences while budget, batch slots and blocks allow (not right after a preemption:
        #    the freed blocks are for the sequences already running)
        while not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.admit(seq)
            n = min(seq.num_uncomputed, budget)
            try:
                self.blocks.grow(seq, seq.num_computed_tokens + n)
            except NoFreeBlocksError:
                # keep what the prefix cache gave only if others are running (they will free blocks);
                # otherwise shrink the chunk to what fits
                free_tokens = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
                n = min(n, free_tokens - seq.num_computed_tokens)
                if n <= 0:
                    self.blocks.release(seq)
                    break
                self.blocks.grow(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch
