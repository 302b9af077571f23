"""The engine's run-ahead (``EngineOptions.overlap``): step N+1 is launched with its input ids carried from step N's
samples on the device before the host reads them. Outputs, stop behaviour, aborts and block accounting must be
exactly those of running the steps one after the other (``overlap=False``)."""

from __future__ import annotations

import torch

from engine.runtime.engine import EngineOptions, LLMEngine
from engine.runtime.request import Delta
from tests.runtime_helpers import text_message


def _drive(engine: LLMEngine, requests: list[dict], abort_after: dict[str, int] | None = None) -> dict[str, list[Delta]]:
    """Run ``requests`` to the end with ``engine.step()``; abort a request once it has streamed N deltas."""
    seqs = [engine.make_sequence(r) for r in requests]
    for seq in seqs:
        engine.add(seq)
    out: dict[str, list[Delta]] = {r["request_id"]: [] for r in requests}
    abort_after = dict(abort_after or {})
    while engine.has_work():
        for delta in engine.step():
            stream = out[delta.request_id]
            assert not (stream and stream[-1].finish_reason), f"{delta.request_id}: a delta after the last one"
            stream.append(delta)
        for request_id, count in list(abort_after.items()):
            if len(out[request_id]) >= count:
                del abort_after[request_id]
                cancelled = engine.abort(request_id)
                if cancelled is not None:
                    out[request_id].append(cancelled)
    blocks = engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks.ref_counts)
    assert engine._inflight is None and not engine.by_id
    return out


def _summary(deltas: list[Delta]) -> tuple:
    last = deltas[-1]
    return ([t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), last.finish_reason,
            last.usage.completion_tokens, [d.token_ids for d in deltas])


def _both(bundle, requests: list[dict], abort_after=None, **options) -> tuple[dict, dict, LLMEngine]:
    results = []
    for overlap in (False, True):
        engine = LLMEngine(bundle, EngineOptions(cache_tokens=4096, block_size=8, overlap=overlap, **options))
        results.append((_drive(engine, [dict(r) for r in requests], abort_after), engine))
    (sequential, _), (ahead, engine) = results
    return sequential, ahead, engine


def _requests(bundle) -> list[dict]:
    prompts = [f"request {i}: " + "word " * (2 + 3 * i) for i in range(6)]
    requests = [{"messages": text_message(p), "max_tokens": 6 + 4 * i, "ignore_eos": i % 2 == 0,
                 "request_id": f"r{i}"} for i, p in enumerate(prompts)]
    requests[1]["max_tokens"] = 1  # finishes at its first token: never run ahead
    requests[3]["stop_token_ids"] = []  # the model's own stop ids still apply (ignore_eos is False)
    return requests


def test_greedy_outputs_and_stream_equal_sequential_steps(tiny_bundle) -> None:
    requests = _requests(tiny_bundle)
    sequential, ahead, engine = _both(tiny_bundle, requests)
    assert engine.steps_ahead > 10  # the run-ahead path really ran
    for r in requests:
        assert _summary(ahead[r["request_id"]]) == _summary(sequential[r["request_id"]]), r["request_id"]
    assert len([t for d in ahead["r1"] for t in d.token_ids]) == 1


def test_stop_string_and_stop_token_finish_without_the_extra_token(tiny_bundle) -> None:
    """A token that ends a request (stop string, stop id) is read one step late; the row the engine already ran
    ahead for it is discarded: nothing streams after the finish, usage counts only emitted tokens."""
    base = {"messages": text_message("say something long"), "max_tokens": 24, "ignore_eos": True}
    probe = _drive(LLMEngine(tiny_bundle, EngineOptions(cache_tokens=4096, overlap=False)),
                   [base | {"request_id": "probe"}])["probe"]
    ids = [t for d in probe for t in d.token_ids]
    text = "".join(d.text for d in probe)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    requests = [base | {"request_id": "by_string", "stop": [stop]},
                base | {"request_id": "by_id", "stop_token_ids": [ids[7]]},
                base | {"request_id": "long", "max_tokens": 30}]
    sequential, ahead, engine = _both(tiny_bundle, requests)
    assert engine.steps_ahead > 5
    for r in requests:
        assert _summary(ahead[r["request_id"]]) == _summary(sequential[r["request_id"]]), r["request_id"]
    assert ahead["by_string"][-1].finish_reason == "stop"
    assert "".join(d.text for d in ahead["by_string"]) == text[: text.index(stop)]
    by_id = [t for d in ahead["by_id"] for t in d.token_ids]
    assert by_id == ids[: ids.index(ids[7]) + 1] and ahead["by_id"][-1].usage.completion_tokens == len(by_id)


def test_abort_while_a_step_is_in_flight(tiny_bundle) -> None:
    """Aborting a request whose next token is still on the device: the cancel delta is its last, its blocks come
    back (checked by _drive), and the others go on exactly as they would have."""
    requests = [{"messages": text_message(f"abort test {i} " * (i + 1)), "max_tokens": 16, "ignore_eos": True,
                 "request_id": f"a{i}"} for i in range(4)]
    sequential, ahead, _ = _both(tiny_bundle, requests, abort_after={"a1": 3})
    for r in requests:
        assert _summary(ahead[r["request_id"]]) == _summary(sequential[r["request_id"]]), r["request_id"]
    cancelled = ahead["a1"]
    assert cancelled[-1].finish_reason == "cancelled"
    assert cancelled[-1].usage.completion_tokens == len([t for d in cancelled for t in d.token_ids]) == 3


def test_sampled_rows_and_penalty_rows_equal_sequential_steps(tiny_bundle) -> None:
    """Seeded temperature / top-p rows run ahead (one draw per step from their own generator, as before); a
    penalty row needs the previous token on the host, so steps with it are not run ahead."""
    requests = [{"messages": text_message(f"sample {i}"), "max_tokens": 12, "ignore_eos": True, "temperature": 0.9,
                 "top_p": 0.8, "seed": 100 + i, "logprobs": 2, "request_id": f"s{i}"} for i in range(3)]
    sequential, ahead, engine = _both(tiny_bundle, requests)
    assert engine.steps_ahead > 5
    for r in requests:
        assert _summary(ahead[r["request_id"]]) == _summary(sequential[r["request_id"]])
        lp = [d.logprobs[0].logprob for d in ahead[r["request_id"]] if d.logprobs]
        assert lp == [d.logprobs[0].logprob for d in sequential[r["request_id"]] if d.logprobs]
    penalised = requests + [{"messages": text_message("penalty"), "max_tokens": 12, "ignore_eos": True,
                             "repetition_penalty": 1.3, "request_id": "p"}]
    sequential, ahead, engine = _both(tiny_bundle, penalised)
    for r in penalised:
        assert _summary(ahead[r["request_id"]]) == _summary(sequential[r["request_id"]])
    assert engine.steps_ahead == 0


def test_admission_and_context_limit_with_run_ahead(tiny_bundle) -> None:
    """A request arriving while others decode goes through the scheduler (the in-flight step is read first); a
    request that reaches the context window finishes with "length" exactly as without run-ahead."""
    engine = LLMEngine(tiny_bundle, EngineOptions(cache_tokens=4096, max_model_len=64))
    first = engine.make_sequence({"prompt_token_ids": list(range(5, 45)), "max_tokens": 24, "ignore_eos": True})
    engine.add(first)
    for _ in range(4):
        engine.step()
    late = engine.make_sequence({"prompt_token_ids": list(range(50, 60)), "max_tokens": 8, "ignore_eos": True})
    engine.add(late)
    while engine.has_work():
        engine.step()
    assert first.finish_reason == "length" and len(first.prompt_ids) + len(first.output_ids) == 64
    assert late.finish_reason == "length" and len(late.output_ids) == 8
    reference = LLMEngine(tiny_bundle, EngineOptions(cache_tokens=4096, max_model_len=64, overlap=False))
    again = reference.make_sequence({"prompt_token_ids": list(range(5, 45)), "max_tokens": 24, "ignore_eos": True})
    reference.add(again)
    while reference.has_work():
        reference.step()
    assert again.output_ids == first.output_ids
    assert engine.steps_ahead > 0 and torch.tensor(first.output_ids).ge(0).all()


def _cpu_decode_graphs(runner):
    """The runner's DecodeGraphs with its CUDA parts replaced for the CPU: a "capture" keeps the packed buffer and
    a "replay" runs the eager forward on the metadata derived from it (decode_views), so the whole host side of a
    graph step (buckets, double-buffered staging, carried ids, mirrored block tables) runs as on the GPU."""
    from engine.runtime.graphs import CapturedDecode, DecodeGraphs, decode_views, packed_size

    graphs = DecodeGraphs(runner)

    class _Event:
        def synchronize(self) -> None: ...
        def record(self) -> None: ...

    def capture(batch: int, keys: int) -> CapturedDecode:
        size = packed_size(batch, keys, runner.block_size)
        packed = torch.zeros(size, dtype=torch.long)
        output = torch.zeros(batch, runner.config.vocab_size)

        class _Graph:
            def replay(self) -> None:
                output.copy_(runner.forward_eager(decode_views(packed, batch, keys, runner.block_size, graphs.carry)))

        static = decode_views(packed, batch, keys, runner.block_size, graphs.carry)
        staging = (torch.full((size,), 3, dtype=torch.long), torch.full((size,), 5, dtype=torch.long))
        return CapturedDecode(_Graph(), static, output, packed, staging, (_Event(), _Event()))

    graphs._capture = capture
    graphs.fused = lambda: True
    return graphs


def test_graph_steps_with_run_ahead_equal_eager_sequential_steps(tiny_bundle) -> None:
    """The decode-graph host path on the CPU (see _cpu_decode_graphs) with run-ahead: inputs written from the
    mirrored block tables into stale staging buffers, ids carried from the previous samples, padded buckets.
    Greedy outputs equal plain eager steps run one after the other."""
    requests = [{"messages": text_message(f"graph {i} " + "word " * (3 * i)), "max_tokens": 5 + 3 * i,
                 "ignore_eos": True, "request_id": f"g{i}"} for i in range(5)]
    plain = LLMEngine(tiny_bundle, EngineOptions(cache_tokens=4096, block_size=8, overlap=False))
    expected = _drive(plain, requests)
    engine = LLMEngine(tiny_bundle, EngineOptions(cache_tokens=4096, block_size=8))
    engine.runner.graphs = _cpu_decode_graphs(engine.runner)
    actual = _drive(engine, requests)
    assert engine.runner.graphs.replays > 10 and engine.steps_ahead > 10
    assert {b for b, _ in engine.runner.graphs.graphs} >= {4, 8}  # padded buckets (5 rows, then fewer)
    for r in requests:
        assert _summary(actual[r["request_id"]]) == _summary(expected[r["request_id"]]), r["request_id"]


def test_decode_warm_up_runs_every_bucket_on_scratch_and_changes_no_output(tiny_bundle) -> None:
    """DecodeGraphs.warm_up (EngineOptions.warm_up_decode) runs each batch bucket up to max_num_seqs's and each key
    bucket up to WARM_UP_MAX_KEYS once on padded rows: only the scratch block is written, nothing is captured, and
    greedy outputs afterwards equal an engine that never warmed up."""
    requests = [{"messages": text_message(f"warm {i} " + "word " * (2 * i)), "max_tokens": 4, "ignore_eos": True,
                 "request_id": f"w{i}"} for i in range(3)]
    expected = _drive(LLMEngine(tiny_bundle, EngineOptions(cache_tokens=4096, block_size=8, overlap=False)), requests)
    engine = LLMEngine(tiny_bundle, EngineOptions(cache_tokens=4096, block_size=8, max_num_seqs=5))
    graphs = engine.runner.graphs = _cpu_decode_graphs(engine.runner)
    runner = engine.runner
    runner.kv_cache.normal_()
    before = runner.kv_cache.clone()
    shapes: list[tuple[int, int]] = []
    eager = runner.forward_eager
    runner.forward_eager = lambda meta: shapes.append(tuple(meta.decode_slots.shape)) or eager(meta)
    steps = graphs.warm_up(engine.options.max_num_seqs)
    runner.forward_eager = eager
    widths = [256, 512, 1024, 2048, 4096]
    assert steps == 4 * len(widths) and sorted(set(shapes)) == [(b, w) for b in (1, 2, 4, 8) for w in widths]
    changed = (runner.kv_cache != before).any(dim=-1).any(dim=0).nonzero().flatten()  # (layers, slots, dim)
    scratch = set(range(runner.scratch_slot, runner.kv_cache.shape[1]))
    assert set(changed.tolist()) <= scratch and len(changed) > 0
    assert graphs.graphs == {} and graphs.replays == 0
    runner.kv_cache.zero_()
    actual = _drive(engine, requests)
    for r in requests:
        assert _summary(actual[r["request_id"]]) == _summary(expected[r["request_id"]]), r["request_id"]
