"""AsyncEngine on the tiny checkpoint: batching, paged latent cache, prefix cache, preemption, cancellation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from engine.runtime.engine import AsyncEngine, EngineOptions, EngineOverloadedError, LLMEngine, RequestTooLongError
from tests.runtime_helpers import (collect, image, image_message, plain_step, reference_tokens, run, text_message,
                                   tokens_of)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _long_text(n_words: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n_words,), generator=gen))


def _mixed_requests() -> list[dict]:
    requests = []
    for i in range(20):
        kind = i % 5
        if kind == 0:
            messages = text_message(f"Question {i}: what is {i} plus {i}?")
        elif kind == 1:
            messages = image_message([image(i)], f"Describe image {i}.")
        elif kind == 2:
            messages = image_message([image(i, (50, 30)), image(i + 100, (112, 112))], "Compare these two.")
        elif kind == 3:
            messages = text_message(_long_text(150 + 10 * i, seed=i))
        else:
            messages = image_message([image(i, (200, 150))], _long_text(40, seed=i))
        requests.append({"messages": messages, "max_tokens": 6 + i % 7, "request_id": f"r{i}"})
    return requests


def _engine(bundle, **options) -> AsyncEngine:
    return AsyncEngine(LLMEngine(bundle, EngineOptions(**options)))


def _assert_all_blocks_free(engine: AsyncEngine | LLMEngine) -> None:
    blocks = (engine.engine if isinstance(engine, AsyncEngine) else engine).blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    assert all(count == 0 for count in blocks.ref_counts)


def test_concurrent_mixed_requests_equal_plain_model(tiny_bundle) -> None:
    requests = _mixed_requests()
    expected = {r["request_id"]: reference_tokens(tiny_bundle, r["messages"], r["max_tokens"]) for r in requests}
    # a small step budget forces chunked prefill of the long prompts while others decode
    engine = _engine(tiny_bundle, max_num_batched_tokens=64, cache_tokens=8192, max_num_seqs=16)

    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    results = run(main())
    for request, deltas in zip(requests, results):
        assert tokens_of(deltas) == expected[request["request_id"]], request["request_id"]
        assert deltas[-1].finish_reason in ("stop", "length")
        assert deltas[-1].usage.completion_tokens == len(expected[request["request_id"]])
    assert engine.engine.steps > 20  # really interleaved, not one request at a time
    _assert_all_blocks_free(engine)
    run(engine.shutdown())


def test_preemption_keeps_outputs(tiny_bundle) -> None:
    requests = [
        {"messages": text_message(_long_text(60, seed=50 + i)), "max_tokens": 24, "ignore_eos": True,
         "request_id": f"p{i}"}
        for i in range(6)
    ]
    expected = {r["request_id"]: reference_tokens(tiny_bundle, r["messages"], 24, stop_ids=[]) for r in requests}
    longest = max(len(tiny_bundle.processor(r["messages"]).input_ids[0]) for r in requests) + 24
    # room for about two sequences: the others must wait or be preempted and recomputed
    engine = _engine(tiny_bundle, cache_tokens=2 * longest + 32, block_size=8)

    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    results = run(main())
    for request, deltas in zip(requests, results):
        assert tokens_of(deltas) == expected[request["request_id"]]
        assert deltas[-1].finish_reason == "length"
    assert engine.engine.stats()["preemptions"] >= 1  # the cache was too small: some were recomputed
    _assert_all_blocks_free(engine)
    run(engine.shutdown())


def test_prefix_cache_hits_do_not_change_outputs(tiny_bundle) -> None:
    system = {"role": "system", "content": _long_text(80, seed=9)}
    first = {"messages": [system, {"role": "user", "content": "first question"}], "max_tokens": 8}
    second = {"messages": [system, {"role": "user", "content": "second question"}], "max_tokens": 8}
    engine = _engine(tiny_bundle, cache_tokens=4096)

    async def main():
        a = await collect(engine, first)
        b = await collect(engine, second)
        c = await collect(engine, first)
        return a, b, c

    a, b, c = run(main())
    assert b[-1].usage.cached_tokens >= 64  # the shared system prompt came from the cache
    assert c[-1].usage.cached_tokens >= len(tiny_bundle.processor(first["messages"]).input_ids[0]) - 16
    assert tokens_of(a) == tokens_of(c) == reference_tokens(tiny_bundle, first["messages"], 8)
    assert tokens_of(b) == reference_tokens(tiny_bundle, second["messages"], 8)
    _assert_all_blocks_free(engine)
    run(engine.shutdown())


def test_prefix_cache_distinguishes_images_with_identical_tokens(tiny_bundle) -> None:
    """Two screenshots after the same text have identical token ids; the cache must not mix them up."""
    prefix = _long_text(40, seed=3)
    shot_a, shot_b = image(1, (112, 112)), image(2, (112, 112))
    req_a = {"messages": image_message([shot_a], prefix), "max_tokens": 6}
    req_b = {"messages": image_message([shot_b], prefix), "max_tokens": 6}
    ids_a = tiny_bundle.processor(req_a["messages"]).input_ids[0].tolist()
    ids_b = tiny_bundle.processor(req_b["messages"]).input_ids[0].tolist()
    assert ids_a == ids_b
    first_pad = ids_a.index(tiny_bundle.tokenizer.media_pad_id)
    engine = _engine(tiny_bundle, cache_tokens=4096, block_size=4)

    other_system = {"messages": [{"role": "system", "content": "Be brief."}, *req_a["messages"]], "max_tokens": 2}

    async def main():
        a = await collect(engine, req_a)
        b = await collect(engine, req_b)
        a_again = await collect(engine, req_a)
        misses = engine.engine.runner.vision_cache.misses
        await collect(engine, other_system)  # a different prefix before the same image: only the vision cache helps
        assert engine.engine.runner.vision_cache.misses == misses
        return a, b, a_again

    a, b, a_again = run(main())
    assert b[-1].usage.cached_tokens <= first_pad  # nothing at or after the image was reused
    assert a_again[-1].usage.cached_tokens > first_pad + 16  # the same image is reused, image tokens included
    assert tokens_of(a) == tokens_of(a_again) == reference_tokens(tiny_bundle, req_a["messages"], 6)
    assert tokens_of(b) == reference_tokens(tiny_bundle, req_b["messages"], 6)
    assert engine.engine.runner.vision_cache.hits >= 1  # the resent image was not re-encoded
    run(engine.shutdown())


def test_cancellation_frees_every_block(tiny_bundle) -> None:
    engine = _engine(tiny_bundle, cache_tokens=4096)
    request = {"messages": text_message(_long_text(50, seed=4)), "max_tokens": 500, "ignore_eos": True}

    async def main():
        seen = 0
        async for _delta in engine.generate(request):
            seen += 1
            if seen == 3:
                break  # closing the iterator cancels the request
        for _ in range(200):
            if engine.engine.blocks.num_free_blocks == engine.engine.blocks.num_blocks:
                break
            await asyncio.sleep(0.01)
        return seen

    assert run(main()) == 3
    _assert_all_blocks_free(engine)
    assert not engine.engine.by_id
    run(engine.shutdown())


def test_engine_survives_a_request_that_raises(tiny_bundle, monkeypatch) -> None:
    engine = _engine(tiny_bundle, cache_tokens=4096)
    original = engine.engine.make_sequence

    def make_sequence(request):
        seq = original(request)
        if seq.request_id == "bad":
            calls = {"n": 0}
            feed = seq.detokenizer.feed

            def exploding_feed(ids):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("boom in the middle")
                return feed(ids)

            seq.detokenizer.feed = exploding_feed
        return seq

    monkeypatch.setattr(engine.engine, "make_sequence", make_sequence)
    good = {"messages": text_message("a fine request"), "max_tokens": 10, "ignore_eos": True, "request_id": "good"}
    bad = {"messages": text_message("a doomed request"), "max_tokens": 10, "ignore_eos": True, "request_id": "bad"}

    async def main():
        return await asyncio.gather(collect(engine, good), collect(engine, bad))

    good_deltas, bad_deltas = run(main())
    assert bad_deltas[-1].finish_reason == "error" and "boom in the middle" in bad_deltas[-1].error
    assert good_deltas[-1].finish_reason == "length" and len(tokens_of(good_deltas)) == 10
    after = run(collect(engine, good | {"request_id": "after"}))
    assert after[-1].finish_reason == "length"
    _assert_all_blocks_free(engine)
    run(engine.shutdown())


def test_admission_limits_and_too_long(tiny_bundle) -> None:
    engine = _engine(tiny_bundle, cache_tokens=256, max_waiting=0)
    with pytest.raises(EngineOverloadedError):
        run(collect(engine, {"messages": text_message("hi"), "max_tokens": 4}))
    run(engine.shutdown())
    engine = _engine(tiny_bundle, cache_tokens=256)
    with pytest.raises(RequestTooLongError, match="KV cache capacity"):
        run(collect(engine, {"messages": text_message("hi"), "max_tokens": 1000}))
    with pytest.raises(RequestTooLongError, match="context window"):
        run(collect(engine, {"messages": text_message("hi"), "max_tokens": 5000}))
    with pytest.raises(ValueError):
        run(collect(engine, {"messages": [], "max_tokens": 4}))
    run(engine.shutdown())


def test_fit_max_tokens_takes_what_the_context_leaves(tiny_bundle) -> None:
    """OpenAI's absent max_tokens: an upper bound lowered to the room after the prompt, never an error unless the
    prompt alone fills the window; an explicit max_tokens that does not fit stays an error."""
    engine = _engine(tiny_bundle, cache_tokens=256)
    window = min(engine.engine.max_model_len, engine.engine.cache_capacity_tokens)
    fitted = engine.engine.make_sequence({"messages": text_message("hi"), "max_tokens": 32768, "fit_max_tokens": True})
    assert len(fitted.prompt_ids) + fitted.max_tokens == window
    small = engine.engine.make_sequence({"messages": text_message("hi"), "max_tokens": 4, "fit_max_tokens": True})
    assert small.max_tokens == 4  # the bound is kept when it fits
    with pytest.raises(RequestTooLongError, match="leaves no room"):
        engine.engine.make_sequence({"messages": text_message("word " * 400), "max_tokens": 8, "fit_max_tokens": True})
    deltas = run(collect(engine, {"messages": text_message("hi"), "max_tokens": 32768, "fit_max_tokens": True,
                                  "ignore_eos": True}))
    assert deltas[-1].finish_reason == "length" and len(tokens_of(deltas)) == fitted.max_tokens
    _assert_all_blocks_free(engine)
    run(engine.shutdown())


def test_seeded_sampling_is_reproducible_across_batches(tiny_bundle) -> None:
    engine = _engine(tiny_bundle, cache_tokens=4096)
    request = {"messages": text_message("tell me a story"), "max_tokens": 12, "temperature": 1.0, "top_p": 0.95,
               "seed": 7, "ignore_eos": True}
    others = [{"messages": text_message(f"noise {i}"), "max_tokens": 12, "temperature": 1.0} for i in range(5)]

    async def alone():
        return await collect(engine, request)

    async def crowded():
        results = await asyncio.gather(collect(engine, request), *(collect(engine, o) for o in others))
        return results[0]

    first, second = run(alone()), run(crowded())
    assert tokens_of(first) == tokens_of(second)
    run(engine.shutdown())


def test_stop_string_and_max_tokens(tiny_bundle) -> None:
    engine = _engine(tiny_bundle, cache_tokens=4096)
    base = {"messages": text_message("count for me"), "max_tokens": 30, "ignore_eos": True}
    full = run(collect(engine, base))
    text = "".join(d.text for d in full)
    assert full[-1].finish_reason == "length" and len(tokens_of(full)) == 30
    # choose a stop string from the middle of the greedy output
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    stopped = run(collect(engine, base | {"stop": [stop]}))
    stopped_text = "".join(d.text for d in stopped)
    assert stopped[-1].finish_reason == "stop"
    assert stopped_text == text[: text.index(stop)]
    run(engine.shutdown())


def _three_decode_rows(tiny_bundle):
    """An engine whose next step decodes three sequences: (engine, that batch, its prepared metadata)."""
    engine = LLMEngine(tiny_bundle, EngineOptions(cache_tokens=2048, block_size=8, overlap=False))
    for i in range(3):
        engine.add(engine.make_sequence({"messages": text_message(_long_text(10 + 7 * i, seed=i)), "max_tokens": 5,
                                         "ignore_eos": True}))
    engine.step()  # prefill all three, sample their first token
    batch = engine.scheduler.schedule()
    assert all(n == 1 for n in batch.num_new_tokens) and len(batch.seqs) == 3
    return engine, batch, engine.runner.prepare(batch.seqs, batch.num_new_tokens)


def _graph_inputs(engine, seqs, rows: int, keys: int, carry=None):
    """The packed inputs a decode graph of ``rows`` x ``keys`` reads, written from the sequences into a buffer full
    of stale (valid) block ids, and the metadata the graph derives from them (run eagerly here)."""
    import numpy as np

    from engine.runtime.graphs import decode_views, packed_size, write_decode_inputs

    runner, bs = engine.runner, engine.options.block_size
    host = np.full(packed_size(rows, keys, bs), 7, dtype=np.int64)
    carry_rows = None if carry is None else carry[1]
    write_decode_inputs(host, seqs, rows, keys, bs, runner.scratch_slot // bs, engine.blocks.tables, carry_rows)
    tokens = torch.zeros(128, dtype=torch.long) if carry is None else torch.cat([carry[0], torch.zeros(128)]).long()
    return decode_views(torch.from_numpy(host), rows, keys, bs, tokens[:128])


@pytest.mark.parametrize("carried", [False, True])
def test_graph_inputs_written_from_sequences_equal_the_prepared_ones(tiny_bundle, carried: bool) -> None:
    """A graph-covered decode step skips ``prepare``: its inputs are written straight into the graph's packed host
    layout (padded to 4 rows and 256 keys) and the graph derives slots, key counts and (carried) ids from them.
    Run through those views eagerly on the CPU, real rows must give the prepared step's logits and cache writes,
    and padded rows may write only the scratch block."""
    engine, batch, meta = _three_decode_rows(tiny_bundle)
    runner = engine.runner
    expected, cache_after = plain_step(runner, meta)
    cache_before = runner.kv_cache.clone()
    n = len(batch.seqs)
    carry = None
    if carried:  # the ids come from the "previous samples" on the device, in another order
        carry = (torch.tensor([0, meta.input_ids[2], meta.input_ids[0], meta.input_ids[1]]), np.array([2, 3, 1]))
    views = _graph_inputs(engine, batch.seqs, 4, 256, carry)
    assert views.input_ids[:n].tolist() == meta.input_ids.tolist()
    assert views.positions[:n].tolist() == meta.positions.tolist()
    assert views.slot_mapping.tolist() == meta.slot_mapping.tolist() + [runner.scratch_slot]
    assert views.decode_lengths.tolist() == meta.decode_mask.sum(1).tolist() + [1]
    assert views.decode_slots[n, 0] == runner.scratch_slot
    width = meta.decode_slots.shape[1]
    assert torch.equal(views.decode_slots[:n, :width][meta.decode_mask], meta.decode_slots[meta.decode_mask])
    for mode in ("modules", "fused"):  # the modules' ops and the fused backend (PyTorch references here)
        runner.decode_backend = mode
        runner.kv_cache.copy_(cache_before)
        actual = runner.forward_eager(views)
        assert torch.isfinite(actual).all(), mode
        assert (actual[:n] - expected).abs().max() < 1e-3, mode
        real = runner.scratch_slot
        assert (runner.kv_cache[:, :real] - cache_after[:, :real]).abs().max() < 1e-4, mode
    runner.decode_backend = "auto"


def test_a_row_with_non_finite_logits_fails_alone(tiny_bundle) -> None:
    """A diverged row (NaN logits) ends its request with a clear error instead of emitting the argmax of NaNs;
    the other rows of the same steps go on, greedy and sampled alike, and every block comes back."""
    engine = LLMEngine(tiny_bundle, EngineOptions(cache_tokens=4096))
    run_step = engine.runner.run_step

    def poisoned(seqs, num_new_tokens, *args):
        logits = run_step(seqs, num_new_tokens, *args).clone()
        for row, seq in enumerate(seqs):
            if seq.request_id.startswith("nan") and len(seq.output_ids) == 2:
                logits[row] = float("nan")
        return logits

    engine.runner.run_step = poisoned
    requests = {
        "nan-greedy": {}, "ok-greedy": {}, "nan-sampled": {"temperature": 0.8, "seed": 1},
        "ok-sampled": {"temperature": 0.8, "seed": 2},
    }
    seqs = {}
    for rid, extra in requests.items():
        seqs[rid] = engine.make_sequence({"messages": text_message(f"request {rid}"), "max_tokens": 6,
                                          "ignore_eos": True, "request_id": rid} | extra)
        engine.add(seqs[rid])
    while engine.has_work():
        engine.step()
    for rid, seq in seqs.items():
        if rid.startswith("nan"):
            assert seq.finish_reason == "error" and "non-finite logits" in seq.error and len(seq.output_ids) == 2
        else:
            assert seq.finish_reason == "length" and len(seq.output_ids) == 6
    _assert_all_blocks_free(engine)
