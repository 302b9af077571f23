"""What the engine streams: JSON-schema outputs, thinking split, UTF-8 pieces, stop strings, logprobs."""

from __future__ import annotations

import asyncio
import json

import torch

from engine.runtime.engine import AsyncEngine, EngineOptions, LLMEngine
from tests.runtime_helpers import collect, run, text_message, tokens_of
from tests.json_schema_helpers import SCHEMAS, validate


def _engine(bundle, **options) -> AsyncEngine:
    return AsyncEngine(LLMEngine(bundle, EngineOptions(**options)))


def test_json_schema_outputs_validate_through_the_engine(tiny_bundle) -> None:
    """Random weights, sampled at temperature 1: every finished output parses and validates."""
    engine = _engine(tiny_bundle, cache_tokens=16384)
    names = list(SCHEMAS)[:12]
    requests = [
        {"messages": text_message(f"Fill in the form ({name})."), "json_schema": SCHEMAS[name], "max_tokens": 400,
         "temperature": 1.0, "seed": i, "request_id": name}
        for i, name in enumerate(names)
    ]

    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    for name, deltas in zip(names, run(main())):
        assert deltas[-1].finish_reason == "stop", (name, deltas[-1])
        text = "".join(d.text for d in deltas)
        validate(json.loads(text), SCHEMAS[name])
    run(engine.shutdown())


class _Script:
    """Makes the model 'say' given token ids: logits are replaced by one-hot rows, per request, in order. It wraps
    the runner's step, which sees every batch (including those the engine runs ahead without the scheduler)."""

    def __init__(self, engine: LLMEngine, scripts: dict[str, list[int]]) -> None:
        self.engine, self.scripts = engine, scripts
        self.run_step = engine.runner.run_step
        engine.runner.run_step = self

    def __call__(self, seqs, num_new_tokens, *args):
        logits = self.run_step(seqs, num_new_tokens, *args)
        rows = [s for s, n in zip(seqs, num_new_tokens) if s.num_computed_tokens + n == len(s)]
        forced = torch.full_like(logits, -1e4)
        for i, seq in enumerate(rows):
            script = self.scripts[seq.request_id]
            forced[i, script[min(len(seq.output_ids), len(script) - 1)]] = 1e4
        return forced


def _scripted_engine(bundle, scripts: dict[str, list[int]], **options) -> AsyncEngine:
    engine = LLMEngine(bundle, EngineOptions(cache_tokens=4096, **options))
    _Script(engine, scripts)
    return AsyncEngine(engine)


def test_thinking_split_and_utf8_streaming(tiny_bundle) -> None:
    tok = tiny_bundle.tokenizer
    said = "◁think▷Les données 世界◁/think▷Réponse: 🎉 ok"
    script = tok.encode(said, allow_special=False) + [tok.im_end_id]
    engine = _scripted_engine(tiny_bundle, {"think": script}, reasoning=True)
    deltas = run(collect(engine, {"messages": text_message("why?"), "max_tokens": 200, "request_id": "think"}))
    assert tokens_of(deltas) == script
    assert "".join(d.reasoning_text for d in deltas) == "Les données 世界"
    assert "".join(d.text for d in deltas) == "Réponse: 🎉 ok"
    assert all("\ufffd" not in d.text + d.reasoning_text for d in deltas)  # no half characters, ever
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage.completion_tokens == len(script)
    run(engine.shutdown())


def test_stop_string_spanning_tokens_and_logprobs(tiny_bundle) -> None:
    tok = tiny_bundle.tokenizer
    said = "alpha beta STOP-HERE gamma"
    script = tok.encode(said, allow_special=False) + [tok.im_end_id]
    engine = _scripted_engine(tiny_bundle, {"s": script})
    stop = "P-HE"  # spans a token boundary in this vocabulary
    deltas = run(collect(engine, {"messages": text_message("go"), "max_tokens": 50, "stop": [stop],
                                  "logprobs": 2, "request_id": "s"}))
    assert "".join(d.text for d in deltas) == "alpha beta STO"
    assert deltas[-1].finish_reason == "stop"
    logprobs = [lp for d in deltas for lp in (d.logprobs or [])]
    assert len(logprobs) == len(tokens_of(deltas)) and all(len(lp.top) == 2 for lp in logprobs)
    assert all(lp.top[0][0] == lp.token_id for lp in logprobs)  # one-hot logits: the chosen token is the top one
    run(engine.shutdown())


def test_max_tokens_and_usage(tiny_bundle) -> None:
    engine = _engine(tiny_bundle, cache_tokens=4096)
    deltas = run(collect(engine, {"messages": text_message("hello"), "max_tokens": 7, "ignore_eos": True}))
    assert deltas[-1].finish_reason == "length"
    assert len(tokens_of(deltas)) == 7 == deltas[-1].usage.completion_tokens
    assert deltas[-1].usage.prompt_tokens == len(tiny_bundle.processor(text_message("hello")).input_ids[0])
    run(engine.shutdown())


def test_sampling_failure_fails_the_request_not_the_engine(tiny_bundle, monkeypatch) -> None:
    import engine.runtime.engine as engine_module

    engine = _engine(tiny_bundle, cache_tokens=4096)
    calls = {"n": 0}
    real_sample = engine_module.sample_async

    def flaky(inp):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("sampler exploded")
        return real_sample(inp)

    monkeypatch.setattr(engine_module, "sample_async", flaky)
    broken = run(collect(engine, {"messages": text_message("one"), "max_tokens": 5, "ignore_eos": True}))
    assert broken[-1].finish_reason == "error" and "sampler exploded" in broken[-1].error
    after = run(collect(engine, {"messages": text_message("two"), "max_tokens": 3, "ignore_eos": True}))
    assert after[-1].finish_reason == "length" and engine.alive
    assert engine.engine.blocks.num_free_blocks == engine.engine.blocks.num_blocks
    run(engine.shutdown())
