"""BlockManager's mirrored block tables (one numpy row per sequence holding blocks) stay equal to the sequences'
block-table lists through admission with prefix hits, growth, preemption-style release and reuse."""

from __future__ import annotations

import random

from engine.runtime.block_manager import BlockManager, NoFreeBlocksError
from engine.runtime.request import GenerateRequest
from engine.runtime.sequence import Sequence


def _seq(tokens: list[int]) -> Sequence:
    request = GenerateRequest(prompt_token_ids=tokens, max_tokens=8)
    return Sequence(request=request, prompt_ids=list(tokens), images=[], sampling=request.sampling(),
                    stop_token_ids=set())


def _check(blocks: BlockManager, seqs: list[Sequence]) -> None:
    rows = [s.table_row for s in seqs if s.block_table]
    assert len(rows) == len(set(rows))  # no two sequences share a row
    for seq in seqs:
        if seq.block_table:
            assert blocks.tables.array[seq.table_row, : len(seq.block_table)].tolist() == seq.block_table
        else:
            assert seq.table_row == -1


def test_mirrored_tables_follow_admit_grow_release() -> None:
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=200, block_size=4)
    shared = [rng.randrange(500) for _ in range(12)]  # a common prefix: admissions hit the prefix cache
    live: list[Sequence] = []
    done: list[Sequence] = []
    for step in range(400):
        action = rng.random()
        if action < 0.3 or not live:
            seq = _seq(shared + [rng.randrange(500) for _ in range(rng.randrange(1, 30))])
            blocks.admit(seq)
            try:
                blocks.grow(seq, len(seq))
            except NoFreeBlocksError:
                blocks.release(seq)
                done.append(seq)
                continue
            seq.num_computed_tokens = len(seq)
            blocks.publish(seq)
            live.append(seq)
        elif action < 0.8:
            seq = rng.choice(live)
            seq.output_ids.append(rng.randrange(500))
            try:
                blocks.grow(seq, len(seq))
                seq.num_computed_tokens = len(seq)
                blocks.publish(seq)
            except NoFreeBlocksError:
                seq.output_ids.pop()
        else:
            seq = live.pop(rng.randrange(len(live)))
            blocks.release(seq)
            done.append(seq)
        _check(blocks, live + done)
    assert blocks.hits > 0  # admissions really attached cached prefix blocks
    assert blocks.tables.array.shape[0] >= len(live)


def test_publish_stops_before_a_pending_token() -> None:
    """A placeholder for a token still on the device is never hashed into the prefix cache."""
    blocks = BlockManager(num_blocks=16, block_size=4)
    seq = _seq([1, 2, 3])
    blocks.admit(seq)
    seq.output_ids.append(-1)  # PENDING_TOKEN
    seq.num_pending = 1
    blocks.grow(seq, 4)
    seq.num_computed_tokens = 4  # the run-ahead step computed the placeholder's position
    blocks.publish(seq)
    assert seq.num_registered_blocks == 0 and not blocks.hash_to_block
    seq.output_ids[-1], seq.num_pending = 9, 0
    blocks.publish(seq)
    assert seq.num_registered_blocks == 1 and len(blocks.hash_to_block) == 1
