"""The engine's run-ahead on CUDA (skipped without a device): decode graphs read carried ids from the device, the
host reads step N's samples while step N+1 runs. Outputs must equal the sequential steps' bit for bit."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(bundle, requests: list[dict], abort: str | None = None, **options):
    from engine.runtime.engine import EngineOptions, LLMEngine

    engine = LLMEngine(bundle, EngineOptions(cache_tokens=16384, **options))
    seqs = [engine.make_sequence(dict(r)) for r in requests]
    for seq in seqs:
        engine.add(seq)
    streamed: dict[str, list[int]] = {r["request_id"]: [] for r in requests}
    finished: set[str] = set()
    while engine.has_work():
        deltas = engine.step()
        for delta in deltas:
            assert delta.request_id not in finished, "a delta after the last one"
            streamed[delta.request_id] += delta.token_ids
            if delta.finish_reason:
                finished.add(delta.request_id)
        if abort and len(streamed[abort]) >= 5 and abort not in finished:
            cancelled = engine.abort(abort)
            assert cancelled is not None and cancelled.usage.completion_tokens == 5
            finished.add(abort)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    outputs = {s.request_id: (s.output_ids, s.finish_reason) for s in seqs}
    assert all(streamed[k] == v[0] for k, v in outputs.items())
    return outputs, engine


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [5, 40, 70])  # one graph bucket, a padded one, and more than the 64-row bucket
def test_run_ahead_with_cuda_graphs_equals_sequential_steps(tiny_checkpoint, rows: int) -> None:
    from engine.loader import load

    bundle = load(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    requests = [{"messages": [{"role": "user", "content": f"question {i} " * (1 + i % 7)}],
                 "max_tokens": 6 + i % 11, "ignore_eos": i % 3 != 0, "request_id": f"q{i}"} for i in range(rows)]
    requests[1]["stop"] = ["e"]
    sequential, _ = _run(bundle, requests, abort="q2", overlap=False, max_num_seqs=128)
    ahead, engine = _run(bundle, requests, abort="q2", overlap=True, max_num_seqs=128)
    assert ahead == sequential
    assert engine.steps_ahead > 3 and engine.runner.graphs.replays > 3


@pytest.mark.gpu
def test_run_ahead_sampled_rows_equal_sequential_steps(tiny_checkpoint) -> None:
    """Seeded temperature / top-p rows: one draw per step from each row's own generator, with or without run-ahead."""
    from engine.loader import load

    bundle = load(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    requests = [{"messages": [{"role": "user", "content": f"sample {i}"}], "max_tokens": 12, "ignore_eos": True,
                 "temperature": 0.8, "top_p": 0.9, "seed": i, "request_id": f"s{i}"} for i in range(6)]
    sequential, _ = _run(bundle, requests, overlap=False)
    ahead, engine = _run(bundle, requests, overlap=True)
    assert ahead == sequential and engine.steps_ahead > 3
